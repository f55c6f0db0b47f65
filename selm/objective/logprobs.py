"""Summed response log-probs for chosen, rejected and exploration responses in one forward pass.

A tokenised example is a prompt and up to three responses. Two layouts feed the same forward:

- "padded": 3B rows ``prompt + response``, right-padded (the plain, reference layout);
- "prefix": one row per example ``prompt | chosen | rejected | exploration`` with a block mask in
  which each response sees the prompt and itself only, and position ids restarting after the
  prompt. The prompt is encoded once instead of three times (prefix sharing).

Both produce a ``LogpBatch`` that says, for every response token, which row and position's hidden
state predicts it. Only those hidden states go through the LM head, so the (tokens x vocab) logits
of prompt and padding positions are never built, and the head walks the vocabulary in chunks
(selm/objective/lmhead.py), so not even the response positions' logits are alive all at once.

``score_logps`` is the one no-grad scoring path (training's reference log-probs, the analyses'
implicit rewards): big length-sorted batches, results in input order.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from selm.chat import encode_prompt, encode_response, end_of_turn_ids, prompt_text, truncate_prompt
from selm.data import PairRecord
from selm.objective.attention import use_segments
from selm.objective.lmhead import token_logps as chunked_token_logps

KINDS = ("chosen", "rejected", "explore")


@dataclass
class TokenizedExample:
    prompt: list[int]
    responses: list[list[int]]  # [chosen, rejected] or [chosen, rejected, exploration]


def truncate(prompt: list[int], response: list[int], *, max_length: int, max_prompt_length: int) -> tuple[list[int], list[int]]:
    """Cut the prompt from the LEFT to max_prompt_length (the latest turn matters most), then cut the
    response at the end so that prompt + response <= max_length. Each response is cut by its own
    length (the authors' code cut the exploration response by the chosen one's)."""
    prompt = truncate_prompt(prompt, max_prompt_length)
    return prompt, response[: max(1, max_length - len(prompt))]


def tokenize_pairs(
    tokenizer, pairs: Sequence[PairRecord], *, max_length: int, max_prompt_length: int, with_exploration: bool
) -> list[TokenizedExample]:
    stop = end_of_turn_ids(tokenizer)
    out = []
    for p in pairs:
        texts = [p.chosen, p.rejected] + ([p.exploration or ""] if with_exploration else [])
        out.append(_tokenize_example(tokenizer, p.prompt, list(zip(texts, p.finished)), stop, max_length=max_length,
                                     max_prompt_length=max_prompt_length))
    return out


def tokenize_responses(tokenizer, items: Sequence[tuple], *, max_length: int, max_prompt_length: int
                       ) -> list[TokenizedExample]:
    """One single-response example per (prompt messages, response text, finished) item, tokenised
    and cut exactly as training's pairs are (for scoring responses that are not in a pair)."""
    stop = end_of_turn_ids(tokenizer)
    return [_tokenize_example(tokenizer, prompt, [(text, finished)], stop, max_length=max_length,
                              max_prompt_length=max_prompt_length) for prompt, text, finished in items]


def _tokenize_example(tokenizer, prompt, responses: Sequence[tuple[str, bool]], stop, *, max_length: int,
                      max_prompt_length: int) -> TokenizedExample:
    ptext = prompt_text(tokenizer, prompt)
    prompt_ids = encode_prompt(tokenizer, prompt)
    out = []
    for text, finished in responses:
        # A response cut at the generation limit is not a finished turn: no end-of-turn token.
        r = encode_response(tokenizer, prompt, text, ptext, stop, finished=finished)
        trunc_prompt, r = truncate(prompt_ids, r, max_length=max_length, max_prompt_length=max_prompt_length)
        out.append(r)
    return TokenizedExample(trunc_prompt, out)


@dataclass
class LogpBatch:
    """One forward pass worth of sequences, plus where each response token's prediction lives.

    input_ids / position_ids: (R, T). attention_mask: (R, T) padding mask for "padded", or a
    (R, 1, T, T) boolean block mask for "prefix". src_row, src_pos, target, seq: (M,) for the M
    response tokens: the token ``target`` is predicted by the hidden state at (src_row, src_pos) and
    belongs to output sequence ``seq`` = kind * B + example index (kind 0 chosen, 1 rejected,
    2 exploration). seg_lens (prefix only): each row's prompt and response lengths, which segment
    attention (selm/objective/attention.py) computes the mask's blocks from.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    src_row: torch.Tensor
    src_pos: torch.Tensor
    target: torch.Tensor
    seq: torch.Tensor
    num_examples: int
    num_kinds: int
    seg_lens: torch.Tensor | None = None  # (R, 1 + K) prompt and response lengths of each prefix row

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens that go through the model."""
        if self.attention_mask.dim() == 2:
            return int(self.attention_mask.sum())
        # Not the block mask's diagonal: padding positions attend to themselves there.
        return int(self.seg_lens.sum())

    def to(self, device) -> "LogpBatch":
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return LogpBatch(**fields)


def collate_padded(examples: Sequence[TokenizedExample], pad_id: int) -> LogpBatch:
    B, K = len(examples), len(examples[0].responses)
    rows = [(e.prompt, e.responses[k], k * B + i) for k in range(K) for i, e in enumerate(examples)]
    T = max(len(p) + len(r) for p, r, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    src_row, src_pos, target, seq = [], [], [], []
    for row, (p, r, s) in enumerate(rows):
        n = len(p) + len(r)
        ids[row, :n] = torch.tensor(p + r)
        mask[row, :n] = 1
        # Response token j sits at len(p)+j and is predicted by the hidden state one position before.
        src_row += [row] * len(r)
        src_pos += range(len(p) - 1, n - 1)
        target += r
        seq += [s] * len(r)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return LogpBatch(ids, mask, pos, torch.tensor(src_row), torch.tensor(src_pos), torch.tensor(target),
                     torch.tensor(seq), B, K)


def collate_prefix(examples: Sequence[TokenizedExample], pad_id: int) -> LogpBatch:
    B, K = len(examples), len(examples[0].responses)
    T = max(len(e.prompt) + sum(len(r) for r in e.responses) for e in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    allowed = torch.zeros((B, T, T), dtype=torch.bool)
    causal = torch.ones((T, T), dtype=torch.bool).tril()
    src_row, src_pos, target, seq = [], [], [], []
    for i, e in enumerate(examples):
        P = len(e.prompt)
        ids[i, :P] = torch.tensor(e.prompt)
        pos[i, :P] = torch.arange(P)
        allowed[i, :P, :P] = causal[:P, :P]
        start = P
        for k, r in enumerate(e.responses):
            L = len(r)
            end = start + L
            ids[i, start:end] = torch.tensor(r)
            pos[i, start:end] = torch.arange(P, P + L)
            allowed[i, start:end, :P] = True  # every response sees the whole prompt
            allowed[i, start:end, start:end] = causal[:L, :L]  # and itself, causally
            # First response token is predicted from the prompt's last position (shared by all
            # three responses), the others from the previous response position.
            src_row += [i] * L
            src_pos += [P - 1] + list(range(start, end - 1))
            target += r
            seq += [k * B + i] * L
            start = end
        # Padding rows attend to themselves so no row of the softmax is empty.
        for t in range(start, T):
            allowed[i, t, t] = True
    seg_lens = torch.tensor([[len(e.prompt)] + [len(r) for r in e.responses] for e in examples])
    return LogpBatch(ids, allowed.unsqueeze(1), pos, torch.tensor(src_row), torch.tensor(src_pos),
                     torch.tensor(target), torch.tensor(seq), B, K, seg_lens)


COLLATORS = {"padded": collate_padded, "prefix": collate_prefix}


class ResponseLogps(nn.Module):
    """Wraps a causal LM so that forward(batch) returns summed response log-probs, shape (K*B,).

    A module (rather than a function) so that DDP/FSDP wrappers see the whole computation as one
    forward. The LM head runs only on the M hidden states that predict response tokens.
    `segments` (default: where the model allows it, selm/objective/attention.py): prefix batches on
    a CPU compute only the block mask's blocks; False keeps the masked SDPA over whole rows.
    """

    def __init__(self, model: nn.Module, segments: bool | None = None):
        super().__init__()
        self.model = model
        self.segments = use_segments(model) if segments in (None, True) else False
        if segments and not self.segments:
            raise ValueError(f"{type(model).__name__} cannot take segment attention")

    def forward(self, input_ids, attention_mask, position_ids, src_row, src_pos, target, seq, num_seqs: int,
                seg_lens=None):
        decoder = self.model.get_decoder()
        extra = {}
        if self.segments and seg_lens is not None and input_ids.device.type == "cpu":
            # The blocks are in seg_lens; a mask would only be built to be ignored.
            attention_mask, extra["seg_lens"] = None, tuple(map(tuple, seg_lens.tolist()))
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, **extra).last_hidden_state  # (R, T, H)
        h = hidden[src_row, src_pos]  # (M, H)
        head = self.model.get_output_embeddings()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if getattr(head, "bias", None) is None and isinstance(getattr(head, "weight", None), torch.Tensor):
            # Vocabulary-chunked: the (M, V) logits are never all alive (selm/objective/lmhead.py).
            token_logps = chunked_token_logps(h, head.weight, target, softcap=cap)  # (M,)
        else:  # a head with a bias (rare): the plain path
            logits = head(h).float()  # (M, V)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            token_logps = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return torch.zeros(num_seqs, dtype=token_logps.dtype, device=token_logps.device).index_add(0, seq, token_logps)


def batch_logps(module: nn.Module, batch: LogpBatch) -> dict[str, torch.Tensor]:
    """Run a ResponseLogps (possibly wrapped) on a batch; returns {"chosen", "rejected"[, "explore"]} -> (B,)."""
    flat = module(batch.input_ids, batch.attention_mask, batch.position_ids, batch.src_row, batch.src_pos,
                  batch.target, batch.seq, batch.num_examples * batch.num_kinds, seg_lens=batch.seg_lens)
    B = batch.num_examples
    return {KINDS[k]: flat[k * B:(k + 1) * B] for k in range(batch.num_kinds)}


def autocast(device, dtype: torch.dtype | None):
    """Mixed precision for a forward on `device`: torch.autocast to `dtype`, or nothing when None."""
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else nullcontext()


def score_logps(
    module: nn.Module,
    examples: Sequence[TokenizedExample],
    *,
    batch_size: int,
    collate: Callable[[Sequence[TokenizedExample], int], LogpBatch],
    pad_id: int,
    device,
    autocast_dtype: torch.dtype | None = None,
    indices: Sequence[int] | None = None,
    num_batches: int | None = None,
    progress: str | None = None,
) -> dict[str, torch.Tensor]:
    """No-grad summed response log-probs of `examples[i]` for each i in `indices` (default: all).

    Returns {"chosen", "rejected"[, "explore"]} -> (len(indices),) float32 CPU tensors whose row j
    belongs to examples[indices[j]], so processes can each score a shard and gather. Examples are
    batched `batch_size` at a time in order of length, so a batch pads little; `module` (a
    ResponseLogps, possibly wrapped) runs in eval mode and is put back in the mode it was in.
    `num_batches` forwards at least that many batches (extra ones repeat an example and are
    dropped): under ZeRO-3 every process must run every forward, even one whose shard ran out.
    `progress` names a progress bar (None: no bar).
    """
    from tqdm.auto import tqdm

    rows = list(range(len(examples))) if indices is None else list(indices)
    n, kinds = len(rows), len(examples[0].responses) if examples else 0
    sizes = [len(examples[i].prompt) + sum(map(len, examples[i].responses)) for i in rows]
    order = sorted(range(n), key=sizes.__getitem__)  # positions in `rows`, shortest first
    out = {KINDS[k]: torch.zeros(n) for k in range(kinds)}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            starts = range(0, max(n, (num_batches or 0) * batch_size), batch_size)
            for start in tqdm(starts, desc=progress, leave=False, disable=progress is None):
                pos = order[start:start + batch_size]
                batch = collate([examples[rows[j]] for j in pos] or [examples[0]], pad_id).to(device)
                with autocast(device, autocast_dtype):
                    lp = batch_logps(module, batch)
                for k, v in lp.items():
                    if pos:
                        out[k][pos] = v.float().cpu()
    finally:
        module.train(was_training)
    return out


def model_logps(model_path, cfg, tokenize: Callable[[object], list[TokenizedExample]], *,
                train_precision: bool) -> tuple[dict[str, torch.Tensor], list[TokenizedExample]]:
    """Load the model at `model_path` (cfg.model's dtype and trust_remote_code) on the default device
    (selm.models.default_device), tokenize with its tokenizer (`tokenize(tokenizer) -> examples`) and
    score the examples as training scores its reference (score_logps, cfg.train's layout and
    ref_batch_size). train_precision: forwards autocast as train.bf16 says, so the log-probs match
    training's; else in the weights' own precision. Returns (score_logps's dict, the examples)."""
    from selm.models import default_device, load_causal_lm, load_tokenizer
    from selm.precision import autocast_dtype

    device = default_device()
    tok = load_tokenizer(model_path, cfg.model.trust_remote_code)
    model = load_causal_lm(model_path, cfg.model.dtype, cfg.model.trust_remote_code).to(device)
    examples = tokenize(tok)
    lp = score_logps(ResponseLogps(model), examples, batch_size=cfg.train.ref_batch_size,
                     collate=COLLATORS[cfg.train.layout], pad_id=tok.pad_token_id, device=device,
                     autocast_dtype=autocast_dtype(cfg.train.bf16, device) if train_precision else None)
    return lp, examples
