"""Deterministic toy judges for the tiny model (tests, CI, configs/tiny.yaml).

The tiny model emits near-random bytes, so these judges score surface statistics that training can
move: the training ranker prefers ASCII letters, the gold judge prefers lowercase vowels. They are
related but distinct, as a training ranker and a gold judge should be. Both take the ranker
interface ``(prompt_messages, responses) -> list[float]``.
"""

from __future__ import annotations

VOWELS = set("aeiou")


def letters_ranker(prompt: list[dict], responses: list[str]) -> list[float]:
    """Fraction of ASCII letters, with a small bonus for length (up to 20 characters)."""
    out = []
    for r in responses:
        letters = sum(c.isascii() and c.isalpha() for c in r)
        out.append(letters / max(1, len(r)) + 0.01 * min(len(r), 20))
    return out


def vowels_gold(prompt: list[dict], responses: list[str]) -> list[float]:
    """Fraction of characters that are lowercase vowels (empty responses score 0)."""
    return [sum(c in VOWELS for c in r) / len(r) if r else 0.0 for r in responses]
