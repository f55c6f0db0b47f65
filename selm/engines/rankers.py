"""Rankers: score each prompt's candidate responses (higher = better).

One interface, six implementations chosen by ``RankConfig.kind``::

    ranker = build_ranker(cfg.rank, key="rank")
    scores = ranker.score(prompts, candidates)   # prompts: list of message lists (ending with a user
    ranker.close()                               # turn); candidates: list (per prompt) of list[str];
                                                 # scores: list (per prompt) of list[float], same shape

- "callable":     a Python function ``f(prompt_messages, responses) -> list[float]``.
- "reward_model": a sequence-classification model read from a local folder with ITS OWN tokenizer
                  and chat template (not the policy's); score = logit 0 at the last non-pad token.
- "pairwise":     ``f(prompt_messages, a, b) -> P(a beats b)``, aggregated over all ordered pairs to
                  a mean win probability per candidate (the authors rank with the pairwise PairRM).
- "pairrm":       llm-blender's PairRM pairwise reward model from a local checkpoint folder (our own
                  implementation, selm/engines/pairrm.py): every ordered pair compared, score = mean
                  over the others of the log-odds of winning, both orders combined (as the authors).
- "http_judge":   an LLM judge behind an OpenAI-compatible ``/chat/completions`` endpoint that rates
                  each response 1-10, many requests in flight at once (selm/engines/llm_client.py; the
                  API key is read from the environment at call time and never stored, logged or put
                  in an error message).
- "llm_pairwise": an LLM judge behind the same kind of endpoint that picks the better of two
                  responses, aggregated like "pairwise" (selm/engines/llm_pairwise.py).

Every ranker's output is checked: one finite score per candidate, else ``RankerError`` naming the
prompt. Errors are one line that starts with the config key ("rank" or "evaluate.judge"). The base
class is in ranker_base.py; ``build_ranker`` in registry.py.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path
from typing import Callable

from selm.chat import Messages, has_chat_template, plain_prompt
from selm.config import RankConfig
from selm.engines.ranker_base import Ranker, RankerError, as_score, chat_client, prompt_where
from selm.io import InputError


def import_function(spec: str | None, key: str) -> Callable:
    """ "package.module:function" -> the function. Errors name the config key, e.g. rank.callable."""
    if not spec or ":" not in spec:
        raise RankerError(f"{key}.callable: expected \"module:function\", got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(_import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        where = ", ".join(str(d) for d in _callable_dirs())
        raise RankerError(f"{key}.callable: cannot import {spec!r}: {e} (looked in the Python path, then {where})") from None
    if not callable(fn):
        raise RankerError(f"{key}.callable: {spec!r} is not callable")
    return fn


def _callable_dirs() -> list[Path]:
    """Where a user's module may live besides the Python path: the config file's folder, then the
    working directory (the `selm` script, unlike `python -m`, does not put the latter on the path)."""
    from selm.config import CALLABLE_DIRS

    return list(dict.fromkeys([*CALLABLE_DIRS, Path.cwd().resolve()]))


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        top = name.split(".")[0]
        if e.name != top:  # the module exists but fails to import something of its own
            raise
    # Appended, not prepended: a file in these folders never shadows an installed package.
    for d in _callable_dirs():
        if str(d) not in sys.path and ((d / f"{top}.py").is_file() or (d / top).is_dir()):
            sys.path.append(str(d))
    importlib.invalidate_caches()
    return importlib.import_module(name)


# ---------------------------------------------------------------------------------------------
# Python functions


class CallableRanker(Ranker):
    """``f(prompt_messages, responses) -> list[float]``, one call per prompt."""

    def __init__(self, cfg: RankConfig, key: str = "rank"):
        super().__init__(cfg, key)
        self.fn = import_function(cfg.callable, key)

    def _score_prompt(self, prompt, responses, ids, i):
        try:
            return self.fn(prompt, list(responses))
        except Exception as e:  # a user function's bug becomes a per-prompt error (skippable)
            raise RankerError(f"{self.key}.callable: {self.cfg.callable!r} raised {type(e).__name__}: {e} "
                              f"({prompt_where(ids, i)})") from e


class PairwiseRanker(Ranker):
    """``f(prompt_messages, a, b) -> P(a beats b)`` aggregated into one score per candidate.

    For candidates c_1..c_n, with p_ij = f(x, c_i, c_j) for every ordered pair i != j:
        q_ij    = (p_ij + 1 - p_ji) / 2          (both presentation orders: cancels position bias)
        score_i = mean over j != i of q_ij       (mean probability of beating the others; in [0, 1])
    n (n - 1) calls per prompt. A single candidate scores 0.5 (nothing to beat).
    """

    def __init__(self, cfg: RankConfig, key: str = "rank"):
        super().__init__(cfg, key)
        self.fn = import_function(cfg.callable, key)

    def _prob(self, prompt, a, b, ij, ids, i) -> float:
        try:
            value = self.fn(prompt, a, b)
        except Exception as e:
            raise RankerError(f"{self.key}.callable: {self.cfg.callable!r} raised {type(e).__name__}: {e} "
                              f"({prompt_where(ids, i)})") from e
        try:
            p = as_score(value)
        except TypeError:
            raise RankerError(f"{self.key}.callable: {self.cfg.callable!r} returned {value!r:.40} for candidates {ij} "
                              f"of {prompt_where(ids, i)}; expected a probability in [0, 1] (a number)") from None
        if not 0.0 <= p <= 1.0:  # also rejects nan
            raise RankerError(f"{self.key}.callable: {self.cfg.callable!r} returned {p} for candidates {ij} of "
                              f"{prompt_where(ids, i)}; expected a probability in [0, 1]")
        return p

    def _score_prompt(self, prompt, responses, ids, i):
        n = len(responses)
        if n == 1:
            return [0.5]
        p = [[0.0] * n for _ in range(n)]
        for a in range(n):
            for b in range(n):
                if a != b:
                    p[a][b] = self._prob(prompt, responses[a], responses[b], (a, b), ids, i)
        return [sum((p[a][b] + 1.0 - p[b][a]) / 2 for b in range(n) if b != a) / (n - 1) for a in range(n)]


# ---------------------------------------------------------------------------------------------
# Reward model


def scoring_dtype(device):
    """A scoring model's dtype: bf16 on a GPU that has it (what reward models are trained in), else
    fp16 on a GPU; fp32 on a CPU (half precision is emulated there, and slow)."""
    import torch

    from selm.precision import native_bf16

    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bf16(device) else torch.float16


class RewardModelRanker(Ranker):
    """A sequence-classification reward model; score = logit[0] at the last non-pad token.

    Text: the reward model's OWN chat template applied to prompt + assistant response (a reward
    model is only meaningful in the format it was trained on). Without a template, the plain
    fallback "User: ...\\n\\nAssistant: <response>" (system/earlier turns likewise).

    Truncation to ``max_length`` tokens (only when the full text is longer): the prompt loses its
    START and the response its END, because the reward depends most on the latest user turn and on
    how the response begins. The prompt keeps at least half the budget (more if the response is
    short); a leading BOS and what the template writes after the response (the end-of-turn token,
    where reward models read their score) are always kept.

    Sequences are right-padded with the model's pad id, so each row's last real token is the
    rightmost non-pad token and causal attention makes scores independent of batch composition.
    """

    def __init__(self, cfg: RankConfig, key: str = "rank"):
        super().__init__(cfg, key)
        import torch
        from transformers import AutoModelForSequenceClassification

        from selm.models import (whole_weights, check_safetensors, default_device, load_tokenizer, local_model_dir,
                                 quiet_transformers)

        if not cfg.model:
            raise RankerError(f"{key}.model: required when {key}.kind is 'reward_model'")
        try:
            path = local_model_dir(cfg.model, f"{key}.model", cfg.revision)
        except InputError as e:
            raise RankerError(str(e)) from None
        try:
            check_safetensors(path)
        except InputError as e:
            raise RankerError(f"{key}.model: {e}") from None
        quiet_transformers()
        self.tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer.padding_side = "right"
        self.device = default_device()
        # Whole weights even after a ZeRO-3 training stage in this process (it would load them
        # partitioned, and the forward fails); half precision on a GPU (a 7B model in fp32 is 28 GB).
        with whole_weights():
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, use_safetensors=True, trust_remote_code=cfg.trust_remote_code, dtype=scoring_dtype(self.device)
            ).to(self.device).eval()
        config = self.model.config
        # The model pools at the rightmost token != config.pad_token_id, so padding must use THAT id.
        if config.pad_token_id is None:
            if self.tokenizer.pad_token_id is None:
                raise RankerError(f"{key}.model: {path}: the tokenizer has neither a pad nor an eos token")
            config.pad_token_id = self.tokenizer.pad_token_id
        self.pad_id = int(config.pad_token_id)
        self.templated = has_chat_template(self.tokenizer)

    def format(self, prompt: Messages, response: str) -> tuple[str, str, str]:
        """The text the reward model reads, in three parts whose concatenation is the full text:
        (prompt incl. the assistant header, response, what the template writes after the response)."""
        if not self.templated:
            return plain_prompt(prompt), " " + response, ""
        full = self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        head = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if not full.startswith(head):
            return full, "", ""  # a template that rewrites earlier turns: no split; truncation keeps the end
        tail = full[len(head):]
        cut = tail.rfind(response) + len(response) if response and response in tail else len(tail)
        return head, tail[:cut], tail[cut:]

    def encode(self, prompt: Messages, response: str) -> list[int]:
        """Token ids of one (prompt, response), at most cfg.max_length (see the class docstring)."""
        tok, limit = self.tokenizer, self.cfg.max_length
        head, body, closing = self.format(prompt, response)
        # A template writes its own BOS; the plain fallback gets the tokenizer's special tokens.
        add_special = not self.templated
        ids = tok(head + body + closing, add_special_tokens=add_special)["input_ids"]
        if len(ids) <= limit:
            return ids
        p = tok(head, add_special_tokens=add_special)["input_ids"]
        r = tok(body, add_special_tokens=False)["input_ids"]
        end = tok(closing, add_special_tokens=False)["input_ids"] if closing else []
        bos = p[:1] if p and tok.bos_token_id is not None and p[0] == tok.bos_token_id else []
        p = p[len(bos):]
        budget = max(0, limit - len(bos) - len(end))
        keep_p = min(len(p), max(budget // 2, budget - len(r)))
        keep_r = budget - keep_p
        return (bos + p[len(p) - keep_p:] + r[:keep_r] + end)[-limit:]

    def _score_batch(self, prompts, candidates, ids):
        import torch

        rows = [self.encode(p, c) for p, cands in zip(prompts, candidates) for c in cands]
        flat: list[float] = [0.0] * len(rows)
        # Longest first, so a batch holds similar lengths (less padding); results go back in order.
        order = sorted(range(len(rows)), key=lambda k: -len(rows[k]))
        bs = self.cfg.batch_size
        with torch.no_grad():
            for start in range(0, len(order), bs):
                chunk = order[start:start + bs]
                width = max(len(rows[k]) for k in chunk)
                input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)  # (B, T)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
                for b, k in enumerate(chunk):
                    input_ids[b, :len(rows[k])] = torch.tensor(rows[k], dtype=torch.long)
                    mask[b, :len(rows[k])] = 1
                try:
                    logits = self.model(input_ids=input_ids.to(self.device),
                                        attention_mask=mask.to(self.device)).logits  # (B, num_labels)
                except Exception as e:
                    where = ", ".join(prompt_where(ids, i) for i in range(len(prompts)))
                    raise RankerError(f"{self.key}.model: forward pass failed ({where}): {type(e).__name__}: {e}") from e
                for b, k in enumerate(chunk):
                    flat[k] = float(logits[b, 0])
        out, k = [], 0
        for cands in candidates:
            out.append(flat[k:k + len(cands)])
            k += len(cands)
        return out

    def close(self) -> None:
        self.model = None


class PairRMRanker(Ranker):
    """PairRM over a local checkpoint folder (``cfg.model``); ``cfg.batch_size`` comparisons per
    forward pass. See selm/engines/pairrm.py for the input format, the head and the aggregation."""

    def __init__(self, cfg: RankConfig, key: str = "rank"):
        super().__init__(cfg, key)
        from selm.engines.pairrm import load_pairrm, source_text

        try:
            self.pairrm = load_pairrm(cfg, key)
        except InputError as e:
            raise RankerError(str(e)) from None
        self._source = source_text

    def _score_batch(self, prompts, candidates, ids):
        try:
            return self.pairrm.rank_scores([self._source(p) for p in prompts], candidates)
        except Exception as e:
            where = ", ".join(prompt_where(ids, i) for i in range(len(prompts)))
            raise RankerError(f"{self.key}.model: PairRM forward pass failed ({where}): {type(e).__name__}: {e}") from e

    def close(self) -> None:
        if getattr(self, "pairrm", None) is not None:
            self.pairrm.close()


# ---------------------------------------------------------------------------------------------
# LLM judge over HTTP

JUDGE_SYSTEM = (
    "You are an impartial judge of AI assistant responses. Rate the assistant's final response to the "
    "conversation on a scale of 1 to 10, considering helpfulness, correctness, relevance to the user's "
    "request, depth and clarity, and harmlessness. 1 = useless, wrong or harmful; 5 = acceptable but "
    "clearly flawed; 10 = excellent in every respect. Do not let length alone raise the rating. "
    "Reply with the rating in exactly this form: Rating: [[N]]"
)

# Most specific first: "[[7]]", then "Rating: 7" (last one wins: a judge may restate it), then a
# bare number ("7", "7/10").
_RATING_PATTERNS = (
    re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]"),
    re.compile(r"rating\s*(?:is)?\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE),
    re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\.?\s*$"),
)


def parse_rating(text: str) -> float | None:
    """The 1-10 rating in a judge's reply, or None if there is none (or it is out of range)."""
    for pattern in _RATING_PATTERNS:
        found = pattern.findall(text)
        if found:
            value = float(found[-1])
            return value if 1.0 <= value <= 10.0 else None
    return None


def render_conversation(prompt: Messages, response: str) -> str:
    turns = [f"[{m['role'].capitalize()}]\n{m['content']}" for m in prompt]
    return "\n\n".join(turns) + f"\n\n[Assistant's response to rate]\n{response}\n[End of response]"


class HttpJudgeRanker(Ranker):
    """Rates each (prompt, response) 1-10 with one request to ``{url}/chat/completions``, temperature 0,
    a whole batch at once with at most ``cfg.endpoint.max_concurrency`` requests in flight (selm/engines/
    llm_client.py: retries with backoff, Retry-After, fewer in flight after a 429, the key redacted).

    Ratings already obtained in the last batch are reused when the rank stage scores a failed
    batch's prompts again one by one, so a judge is never paid twice for the same rating.
    """

    def __init__(self, cfg: RankConfig, key: str = "rank", backoff_s: float = 1.0):
        super().__init__(cfg, key)
        self.client = chat_client(cfg, key, backoff_s)
        self.endpoint = self.client.endpoint
        self._known: dict[str, float] = {}  # request body (JSON) -> rating, from the last batch

    def _body(self, prompt: Messages, response: str) -> dict:
        return {"messages": [{"role": "system", "content": JUDGE_SYSTEM},
                             {"role": "user", "content": render_conversation(prompt, response)}],
                "temperature": 0, "max_tokens": 256}

    def _score_batch(self, prompts, candidates, ids):
        from selm.engines.llm_client import ChatError

        items = [(i, self._body(p, r)) for i, (p, cands) in enumerate(zip(prompts, candidates)) for r in cands]
        keys = [json.dumps(b, sort_keys=True) for _, b in items]
        todo = [k for k in range(len(items)) if keys[k] not in self._known]
        replies = self.client.complete([items[k][1] for k in todo], where=[prompt_where(ids, items[k][0]) for k in todo],
                                       return_exceptions=True)
        ratings: dict[int, float] = {k: self._known[keys[k]] for k in range(len(items)) if keys[k] in self._known}
        first_error: RankerError | None = None
        for k, reply in zip(todo, replies):
            if isinstance(reply, ChatError):
                first_error = first_error or RankerError(str(reply))
                continue
            rating = parse_rating(reply.text)
            if rating is None:
                where = prompt_where(ids, items[k][0])
                first_error = first_error or RankerError(self.client.redact(
                    f"{self.key}: {where}: no 1-10 rating in the judge's reply {reply.text[:120]!r}"))
                continue
            ratings[k] = rating
        if len(prompts) > 1:  # a batch, not the rank stage's one-by-one retry of a failed batch
            self._known = {keys[k]: v for k, v in ratings.items()}
        if first_error is not None:
            raise first_error
        out, k = [], 0
        for cands in candidates:
            out.append([ratings[k + j] for j in range(len(cands))])
            k += len(cands)
        return out
