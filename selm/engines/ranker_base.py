"""What every ranker shares: the `Ranker` base class (score, output checks, close), `RankerError`, and
the HTTP client of the two LLM judges (http_judge in rankers.py, llm_pairwise in llm_pairwise.py).
The kinds themselves are in rankers.py and llm_pairwise.py; registry.py picks one by name."""

from __future__ import annotations

import math
from typing import Any, Sequence

from selm.chat import Messages
from selm.config import ConfigError, RankConfig, check_judge
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
            out = [as_score(s) for s in scores]
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
    """The ChatClient of an LLM judge (http_judge, llm_pairwise) from its section's `endpoint`."""
    from selm.engines.llm_client import ChatError, endpoint_client

    try:
        check_judge(key, cfg)  # its url and model are there
        return endpoint_client(cfg.endpoint, f"{key}.endpoint", backoff_s=backoff_s)
    except (ChatError, ConfigError) as e:
        raise RankerError(str(e)) from None


def score_in_chunks(ranker: Ranker, prompts: list[Messages], candidates: list[list[str]],
                    ids: Sequence[Any] | None = None, *, chunk_size: int, on_error: str | None = None,
                    progress: str | None = None) -> list[list[float] | str]:
    """Every prompt's scores, in input order: the prompts are cut into chunks of `chunk_size` (one
    `ranker.score` call each), each process scores every world-th chunk, and the results are merged
    back in order on every process, so they are the single-process ones.

    on_error None: a RankerError propagates as it is. "fail" or "skip" (needs `ids`): a failed chunk
    is scored again one prompt at a time, so the error is pinned on the right prompt_id and the others
    still get scored; "fail" then raises it, "skip" puts its one-line reason (a str) in that prompt's
    place. `progress` labels a progress bar (main process only).
    """
    from tqdm.auto import tqdm

    from selm import dist

    starts = list(range(0, len(prompts), chunk_size))
    mine = dist.shard(starts)
    results: dict[int, list] = {}
    with tqdm(total=sum(len(prompts[s:s + chunk_size]) for s in mine), desc=progress, unit="prompt",
              disable=progress is None or not dist.is_main()) as bar:
        for s in mine:
            chunk = range(s, min(s + chunk_size, len(prompts)))
            results[s] = _score_chunk(ranker, prompts, candidates, ids, chunk, on_error)
            bar.update(len(chunk))
    results = dist.merged(results)
    return [r for s in starts for r in results[s]]


def _score_chunk(ranker: Ranker, prompts, candidates, ids, chunk: range, on_error: str | None) -> list[list[float] | str]:
    """One call for the chunk; if it fails (and on_error is set), each prompt again alone."""
    chunk_ids = [ids[i] for i in chunk] if ids is not None else None
    try:
        return ranker.score([prompts[i] for i in chunk], [candidates[i] for i in chunk], ids=chunk_ids)
    except RankerError as e:
        if on_error is None:
            raise
        if len(chunk) == 1:
            return [_failed(ids[chunk[0]], e, on_error)]
    out: list[list[float] | str] = []
    for i in chunk:
        try:
            out.append(ranker.score([prompts[i]], [candidates[i]], ids=[ids[i]])[0])
        except RankerError as e:
            out.append(_failed(ids[i], e, on_error))
    return out


def _failed(prompt_id: Any, error: RankerError, on_error: str) -> str:
    """Raise (on_error "fail") or return the reason a prompt is skipped; both name the prompt_id."""
    msg = str(error)
    if repr(prompt_id) not in msg:
        msg = f"{msg} (prompt_id {prompt_id!r})"
    if on_error == "fail":
        raise RankerError(msg) from error
    return msg


def as_score(value: Any) -> float:
    """A score as a float: an int or float, or a NumPy or one-element torch number. A string is
    refused even when it spells a number (a ranker returning text has a bug the score would hide),
    and so is a bool (most often a comparison returned by mistake; return 0 or 1 if that is meant)."""
    import numbers

    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:  # a torch tensor
        value = value.item()
    elif hasattr(value, "dtype") and hasattr(value, "item") and getattr(value, "shape", None) == ():  # NumPy 0-d
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"expected a number, got {value!r:.40}")
    return float(value)
