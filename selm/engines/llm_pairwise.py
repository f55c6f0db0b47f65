"""An LLM pairwise judge behind an OpenAI-compatible ``/chat/completions`` endpoint: shown a
conversation and two responses labelled A and B, it answers "A" or "B".

P(A better) comes from the first answer token's top log-probabilities of "A" and "B" when the
endpoint returns them (soft), else from the answer's letter (1 or 0). Requests go through
selm/engines/llm_client.py (many in flight, input order kept, retries with backoff and Retry-After,
the key read from the environment per request and redacted from errors).

As a ranker (rank.kind: llm_pairwise) it scores candidates like the "pairwise" ranker: every
ordered pair judged, P(i beats j) averaged over both orders, score = mean over the others.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from selm.chat import Messages
from selm.config import RankConfig
from selm.engines.ranker_base import Ranker, RankerError, chat_client, prompt_where

PAIRWISE_SYSTEM = (
    "You compare two AI assistant responses to the same conversation and decide which one serves the "
    "user better: more helpful, more correct, more relevant to what was asked, clearer, and harmless. "
    "Judge the substance. A response is not better for being longer, and which response comes first "
    "says nothing about its quality. Reply with a single letter: A if Response A is better, B if "
    "Response B is better."
)
TOP_LOGPROBS = 5
_VERDICT = re.compile(r"^\W*(?:response\s*)?([AB])\b", re.IGNORECASE)


def render_pair(prompt: Messages, a: str, b: str) -> str:
    turns = [f"[{m['role'].capitalize()}]\n{m['content']}" for m in prompt]
    return ("\n\n".join(turns) + f"\n\n[Response A]\n{a}\n[End of Response A]\n\n[Response B]\n{b}\n"
            "[End of Response B]\n\nWhich response is better? Answer A or B.")


def parse_verdict(text: str) -> str | None:
    """"A" or "B" from the start of a judge's reply ("A", "B.", "Response B", "**A**"), else None."""
    m = _VERDICT.match(text or "")
    return m.group(1).upper() if m else None


def probability_of_a(top_logprobs: dict[str, float] | None) -> float | None:
    """P(A) from the first token's alternatives: mass of "A" over that of "A" + "B" (tokens compared
    without spaces and case). None when there are none or they name neither; when only one of the
    two is among them, the other counts as 0."""
    mass = {"A": 0.0, "B": 0.0}
    for token, lp in (top_logprobs or {}).items():
        t = token.strip().upper()
        if t in mass and math.isfinite(lp):
            mass[t] += math.exp(lp)
    total = mass["A"] + mass["B"]
    return mass["A"] / total if total > 0 else None


class LLMPairwiseRanker(Ranker):
    """``judge([(prompt, a, b, where), ...]) -> [{"p_a", "verdict", "soft", "reply"} | RankerError]``."""

    def __init__(self, cfg: RankConfig, key: str = "rank", backoff_s: float = 1.0):
        super().__init__(cfg, key)
        self.client = chat_client(cfg, key, backoff_s)

    def judge(self, items: Sequence[tuple[Messages, str, str, str]]) -> list[dict | RankerError]:
        """One verdict per (prompt, a, b, where), in order, requests in flight together; an item whose
        request failed for good, or whose reply names neither A nor B, gets its RankerError instead."""
        from selm.engines.llm_client import ChatError

        bodies = [{"messages": [{"role": "system", "content": PAIRWISE_SYSTEM},
                                {"role": "user", "content": render_pair(p, a, b)}]} for p, a, b, _ in items]
        replies = self.client.complete(bodies, where=[w for *_, w in items], return_exceptions=True,
                                       temperature=0, max_tokens=8, logprobs=True, top_logprobs=TOP_LOGPROBS)
        out: list[dict | RankerError] = []
        for (*_, where), reply in zip(items, replies):
            if isinstance(reply, ChatError):
                out.append(RankerError(str(reply)))
                continue
            verdict, soft = parse_verdict(reply.text), probability_of_a(reply.top_logprobs)
            if verdict is None and soft is None:
                out.append(RankerError(self.client.redact(
                    f"{self.key}: {where}: no A/B verdict in the judge's reply {reply.text[:120]!r}")))
                continue
            p = soft if soft is not None else float(verdict == "A")
            out.append({"p_a": p, "verdict": verdict or ("A" if p >= 0.5 else "B"), "soft": soft is not None,
                        "reply": reply.text[:200]})
        return out

    def _score_prompt(self, prompt, responses, ids, i):
        """As PairwiseRanker: q_ij = (p_ij + 1 - p_ji) / 2, score_i = mean over j != i of q_ij."""
        n = len(responses)
        if n == 1:
            return [0.5]
        pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
        verdicts = self.judge([(prompt, responses[a], responses[b], f"{prompt_where(ids, i)}, candidates {(a, b)}")
                               for a, b in pairs])
        for v in verdicts:
            if isinstance(v, RankerError):
                raise v
        p = {ab: v["p_a"] for ab, v in zip(pairs, verdicts)}
        return [sum((p[a, b] + 1.0 - p[b, a]) / 2 for b in range(n) if b != a) / (n - 1) for a in range(n)]
