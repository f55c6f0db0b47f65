"""What every ranker shares: the `Ranker` base class (score, output checks, close), `RankerError`, and
the HTTP client of the two LLM judges (http_judge in rankers.py, llm_pairwise in llm_pairwise.py).
The kinds themselves are in rankers.py and llm_pairwise.py; registry.py picks one by name."""

from __future__ import annotations

import math
from typing import Any, Sequence

from selm.chat import Messages
from selm.config import RankConfig
from selm.io import InputError


class RankerError(InputError):
    """A ranker failed or returned bad scores. It is an InputError so that the CLI prints it on one
    line; the rank stage catches it (and only it) when ``on_error: skip``."""


def prompt_where(ids: Sequence[Any] | None, i: int) -> str:
    return f"prompt_id {ids[i]!r}" if ids is not None else f"prompt {i}"


class Ranker:
    """Base class. Subclasses implement ``_score_prompt`` (one prompt) or override ``_score_batch``
    (many prompts in one go, e.g. a model forward pass)."""

    def __init__(self, cfg: RankConfig, key: str = "rank"):
        self.cfg = cfg
        self.key = key

    def score(self, prompts: list[Messages], candidates: list[list[str]],
              ids: Sequence[Any] | None = None) -> list[list[float]]:
        """Shapes: prompts (P,), candidates (P, n_p) -> scores (P, n_p) as Python floats.
        ``ids`` (P,) only serve error messages ("prompt_id 'x'" rather than "prompt 3")."""
        if len(prompts) != len(candidates):
            raise RankerError(f"{self.key}: {len(prompts)} prompts but {len(candidates)} candidate lists")
        raw = self._score_batch(prompts, candidates, ids)
        if len(raw) != len(prompts):
            raise RankerError(f"{self.key}: ranker returned {len(raw)} score lists for {len(prompts)} prompts")
        return [self._check(s, len(c), ids, i) for i, (s, c) in enumerate(zip(raw, candidates))]

    def _score_batch(self, prompts, candidates, ids) -> list[list[float]]:
        return [self._score_prompt(p, c, ids, i) for i, (p, c) in enumerate(zip(prompts, candidates))]

    def _score_prompt(self, prompt: Messages, responses: list[str], ids, i: int) -> list[float]:
        raise NotImplementedError

    def _check(self, scores: Any, n: int, ids, i: int) -> list[float]:
        where = prompt_where(ids, i)
        try:
            out = [float(s) for s in scores]
        except (TypeError, ValueError):
            raise RankerError(f"{self.key}: {where}: expected a list of numbers, got {scores!r:.80}") from None
        if len(out) != n:
            raise RankerError(f"{self.key}: {where}: {len(out)} scores for {n} candidates")
        bad = [s for s in out if not math.isfinite(s)]
        if bad:
            raise RankerError(f"{self.key}: {where}: non-finite score {bad[0]}")
        return out

    def close(self) -> None:
        """Release resources (model memory, connections). Safe to call twice."""

    def __enter__(self) -> "Ranker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def chat_client(cfg: RankConfig, key: str, backoff_s: float):
    """The ChatClient of an LLM judge (http_judge, llm_pairwise) from its rank settings."""
    from selm.engines.llm_client import ChatClient, ChatError

    if not cfg.url or not cfg.judge_model:
        raise RankerError(f"{key}.url: url and judge_model are required when {key}.kind is {cfg.kind!r}")
    try:
        return ChatClient(cfg.url, cfg.judge_model, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s,
                          max_retries=cfg.max_retries, max_concurrency=cfg.max_concurrency, backoff_s=backoff_s, key=key,
                          extra_body=cfg.extra_body)
    except ChatError as e:
        raise RankerError(str(e)) from None
