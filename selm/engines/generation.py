"""The generation engine: prompts (chat messages) in, k sampled and/or one greedy response out.

The "hf" backend is our own decoding loop over a Hugging Face causal LM and its KV cache, not
`model.generate`, because on CPU the per-step Python overhead of `generate` dominates small models
and `num_return_sequences` prefills every prompt k times (benchmarks/generate.py measures both):

- prompts are sorted by token length and batched (left padding + attention mask + explicit position
  ids), then results are put back in input order;
- each prompt is prefilled ONCE; the KV cache is then repeated for its k samples (+ greedy row);
- each step computes logits for the last position only; rows stop at the chat template's
  end-of-turn token, and finished rows are dropped from the cache once a quarter of a batch is done;
- on a CPU, fp32 (and bf16) linear layers run on weights pre-packed for oneDNN while a `generate`
  call lasts (`packed_linears`): torch's default fp32 GEMM was up to 2x slower at decoding's
  few-row shapes; sampling finds the inverse-CDF token in two levels (`inverse_cdf`).

Sampling randomness is a counter-based hash of (seed, prompt index, sample index, step), one uniform
per row and step, used by inverse-CDF sampling. So sample j of prompt i does not depend on batch
size, batch composition or on how many other samples were asked for (up to float rounding in the
batched forward), and asking for k+1 samples returns the same first k.

A backend is anything with `generate(prompts, params, progress) -> list[list[Sample]]`
(`Generator`, in sampling.py with the sampling settings and random streams both backends share);
`build_generator` picks one by name ("hf" here, "vllm" in vllm_backend.py).
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Sequence

import torch

from selm import dist
from selm.chat import Messages, decode_response, end_of_turn_ids
from selm.config import Config
from selm.engines.sampling import Generator, Sample, SamplingParams, encode_for_generation, stream_keys, uniforms


# --------------------------------------------------------------------------------------------
# Token choice


def next_tokens(logits: torch.Tensor, greedy_rows: torch.Tensor, keys: torch.Tensor, step: int,
                temperature: float, top_p: float) -> torch.Tensor:
    """Pick one token per row. logits: (N, V); greedy_rows: (N,) bool; keys: (N,) int64 -> (N,) int64.

    Sampled rows use temperature, then nucleus (top_p) filtering, then inverse-CDF sampling with the
    row's uniform for this step: the token whose cumulative-probability interval holds u.
    """
    any_greedy = bool(greedy_rows.any())
    if any_greedy and bool(greedy_rows.all()):
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (N, V)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        before = probs.cumsum(-1) - probs
        probs = probs * (before < top_p)
    idx = inverse_cdf(probs, uniforms(keys, step).to(probs.device))
    sampled = order.gather(1, idx.unsqueeze(1)).squeeze(1) if order is not None else idx
    return torch.where(greedy_rows, logits.argmax(-1), sampled) if any_greedy else sampled


CDF_BLOCK = 256


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the index whose interval of the float64 cumulative sum of `probs` (N, V) holds
    u (N,) float64 in [0, 1) times the row's total; zero-probability entries are never chosen.

    In two levels, the same token as one cumulative sum over the whole row (up to float64 rounding):
    the block of CDF_BLOCK entries holding the point, from the cumulative sum of block sums, then
    the entry inside that block. A whole-row float64 cumulative sum per step cost about as much as
    the rest of sampling together at 16 rows and a 49,152-token vocabulary.
    """
    n, v = probs.shape
    pad = -v % CDF_BLOCK
    blocks = (torch.nn.functional.pad(probs, (0, pad)) if pad else probs).view(n, -1, CDF_BLOCK)  # (N, B, CDF_BLOCK)
    mass = blocks.sum(-1, dtype=torch.float64)  # (N, B)
    ends = mass.cumsum(-1)
    point = (u * ends[:, -1]).unsqueeze(1)  # (N, 1); u < 1, so it lies below the total
    # right=True skips zero-mass blocks and entries (their cumulative sum equals the previous one).
    b = torch.searchsorted(ends, point, right=True).clamp_max(ends.shape[1] - 1)  # (N, 1)
    start = torch.nn.functional.pad(ends[:, :-1], (1, 0)).gather(1, b)  # the mass before block b
    inner = blocks.gather(1, b.unsqueeze(2).expand(n, 1, CDF_BLOCK)).squeeze(1).double().cumsum(-1) + start
    j = torch.searchsorted(inner, point, right=True).clamp_max(CDF_BLOCK - 1)
    return (b * CDF_BLOCK + j).squeeze(1).clamp_max(v - 1)


# --------------------------------------------------------------------------------------------
# The decoding loop


def _forward_kwargs(model) -> dict:
    """Per-model forward arguments: the KV cache's keyword (`cache` in transformers 5, formerly
    `past_key_values`) and logits for the last position only, where the model supports it."""
    params = inspect.signature(model.forward).parameters
    kw = {"cache_kw": "cache" if "cache" in params else "past_key_values"}
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    return kw


def _preallocated_cache(model, capacity: int):
    """A DynamicCache whose full-attention layers append in place into buffers of `capacity` tokens.

    The stock DynamicLayer does torch.cat of the whole cache at every step, which copies O(T) per step
    per layer: at a few hundred tokens on CPU that costs about as much as the forward itself. Layers of
    other kinds (sliding window, linear attention) keep their own class. Returns None when this
    transformers version has no per-layer cache, and the model then builds its own.
    """
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return None
    if not hasattr(DynamicLayer, "lazy_initialization"):
        return None

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self._buf: tuple[torch.Tensor, torch.Tensor] | None = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.get_seq_length()
            m = n + key_states.shape[-2]
            kb = self._buf[0] if self._buf is not None else None
            # batch_select_indices / batch_repeat_interleave replace self.keys with a fresh tensor:
            # then (or when full) copy into a new buffer once.
            if (kb is None or m > kb.shape[-2] or kb.shape[0] != key_states.shape[0]
                    or (n > 0 and self.keys.data_ptr() != kb.data_ptr())):
                cap = max(m, self.capacity)
                new = []
                for old, cur in ((self.keys, key_states), (self.values, value_states)):
                    b = cur.new_empty((*cur.shape[:-2], cap, cur.shape[-1]))
                    if n > 0:
                        b[..., :n, :] = old
                    new.append(b)
                self._buf = (new[0], new[1])
            kb, vb = self._buf
            kb[..., n:m, :] = key_states
            vb[..., n:m, :] = value_states
            self.keys, self.values = kb[..., :m, :], vb[..., :m, :]
            return self.keys, self.values

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers without config-built layers
        return None
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in layers]
    return cache


def _forward(model, fkw: dict, input_ids, attention_mask, position_ids, cache):
    """One forward pass returning last-position logits (N, V) float32 and the updated cache."""
    extra = {k: v for k, v in fkw.items() if k != "cache_kw"}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, **{fkw["cache_kw"]: cache}, **extra)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out.logits[:, -1, :].float(), new_cache


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> input_ids (B, L) and attention_mask (B, L) (1 = real token)."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def decode_batch(model, prompt_ids: Sequence[Sequence[int]], prompt_index: Sequence[int],
                 params: SamplingParams, stop_ids: Sequence[int], pad_id: int = 0
                 ) -> tuple[list[list[int]], list[bool]]:
    """Generate for one batch of B prompts; rows are prompt-major: prompt b's rows are
    b*R .. b*R+R-1 with R = params.rows_per_prompt (samples first, then the greedy row).

    prompt_index: each prompt's index in the caller's full list (it keys the random stream).
    Returns per row the generated ids (end-of-turn excluded) and whether the turn ended.
    """
    device = next(model.parameters()).device
    fkw = _forward_kwargs(model)
    R = params.rows_per_prompt
    B = len(prompt_ids)
    N = B * R

    ids, attn = left_pad(prompt_ids, pad_id, device)  # (B, L)
    # Positions count real tokens only, so a left-padded prompt sees the same positions as unpadded.
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    cache = _preallocated_cache(model, ids.shape[1] + params.max_new_tokens)
    logits, cache = _forward(model, fkw, ids, attn, pos, cache)  # (B, V)

    # One prefill per prompt, then R decoding rows per prompt share a copy of its cache.
    if R > 1:
        cache.batch_repeat_interleave(R)
        logits = logits.repeat_interleave(R, dim=0)
        attn = attn.repeat_interleave(R, dim=0)
        pos = pos.repeat_interleave(R, dim=0)
    next_pos = pos[:, -1] + 1  # (N,)
    sample_idx = torch.arange(R).repeat(B)  # (N,)
    greedy_rows = (sample_idx == params.num_samples) if params.include_greedy else torch.zeros(N, dtype=torch.bool)
    keys = stream_keys(params.seed, torch.tensor(prompt_index, dtype=torch.long).repeat_interleave(R), sample_idx)
    greedy_rows, keys = greedy_rows.to(device), keys.to(device)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], dtype=torch.long, device=device)

    out = torch.full((N, params.max_new_tokens), pad_id, dtype=torch.long)  # (N, T) on CPU
    lengths = torch.full((N,), params.max_new_tokens, dtype=torch.long)  # set when a row ends its turn
    finished = torch.zeros(N, dtype=torch.bool)
    rows = torch.arange(N)  # (n,) original row of each cache row
    alive = torch.ones(N, dtype=torch.bool, device=device)  # (n,) rows of the cache still generating

    for step in range(params.max_new_tokens):
        tok = next_tokens(logits, greedy_rows, keys, step, params.temperature, params.top_p)  # (n,)
        is_stop = torch.isin(tok, stop)
        tok_cpu, alive_cpu, stop_cpu = tok.cpu(), alive.cpu(), is_stop.cpu()
        # Every live row has produced exactly `step` tokens, so its token goes in column `step`.
        live = alive_cpu & ~stop_cpu
        out[rows[live], step] = tok_cpu[live]
        ended = rows[alive_cpu & stop_cpu]
        finished[ended] = True
        lengths[ended] = step
        alive = alive & ~is_stop
        n_alive = int(alive.sum())
        if n_alive == 0 or step == params.max_new_tokens - 1:
            break
        # Drop finished rows from the cache once they are a quarter of it: the copy costs about
        # one step, so doing it per finished row would cost more than computing dead rows.
        if 4 * (len(rows) - n_alive) >= len(rows):
            keep = torch.nonzero(alive).flatten()
            cache.batch_select_indices(keep)
            keep_cpu = keep.cpu()
            rows, attn, next_pos = rows[keep_cpu], attn[keep], next_pos[keep]
            tok, greedy_rows, keys = tok[keep], greedy_rows[keep], keys[keep]
            alive = alive[keep]
        attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
        logits, cache = _forward(model, fkw, tok.unsqueeze(1), attn, next_pos.unsqueeze(1), cache)
        next_pos = next_pos + 1
    return [out[r, :n].tolist() for r, n in enumerate(lengths.tolist())], finished.tolist()


# --------------------------------------------------------------------------------------------
# Pre-packed weights


def _can_pack(model) -> bool:
    # The packing ops are oneDNN's (present in CPU builds of torch with mkldnn).
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and all(p.device.type == "cpu" for p in model.parameters()))


@contextlib.contextmanager
def packed_linears(model):
    """While inside, the model's fp32 and bf16 `nn.Linear` layers on a CPU multiply with a copy of
    their weights reordered once into oneDNN's blocked layout (torch.ops.mkldnn._linear_pointwise).

    torch's fp32 `linear` (MKL sgemm) re-reads the plain row-major weight every call; at decoding's
    shapes (16-96 rows, K = 576-1536) oneDNN's packed kernels measured 1.1-2.2x faster on an AVX-512
    CPU (the LM head most); in bf16, on a CPU whose bf16 oneDNN supports, 1.05-1.65x (AVX512-BF16).
    Results equal `linear` up to float rounding. The copies cost as much memory as those weights, so
    they are made only when twice that is available, and are freed on exit; layers whose forward is
    already replaced (hooks, adapters) are left alone.
    """
    layers = []
    if _can_pack(model):
        # Private oneDNN probes: looked up defensively, as other torch builds may lack them.
        bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
        dtypes = (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)
        layers = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)
                  and m.weight.dtype in dtypes]
    if layers:
        import psutil

        if 2 * sum(m.weight.nbytes for m in layers) > psutil.virtual_memory().available:
            layers = []
    try:
        for m in layers:
            m.forward = _packed_forward(torch.ops.mkldnn._reorder_linear_weight(m.weight.detach()), m.bias)
        yield
    finally:
        for m in layers:
            vars(m).pop("forward", None)


def _packed_forward(packed: torch.Tensor, bias):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return forward


# --------------------------------------------------------------------------------------------
# The Hugging Face backend


class HFGenerator:
    """Our decoding loop over an already-loaded Hugging Face causal LM (on any device)."""

    def __init__(self, model, tokenizer, batch_size: int, max_prompt_length: int | None = None):
        if batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        self.max_prompt_length = max_prompt_length
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_ids = end_of_turn_ids(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0

    def generate(self, prompts: Sequence[Messages | str], params: SamplingParams,
                 progress: str | None = None) -> list[list[Sample]]:
        from tqdm.auto import tqdm

        encoded = encode_for_generation(self.tokenizer, prompts, self.max_prompt_length)
        # Longest first: similar lengths share a batch (little padding) and memory peaks early.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        # Under several processes each rank decodes every world-th batch: the batches are the ones one
        # process would form, and the random streams are keyed by the prompt's index in `prompts`, so
        # the merged result is the single-process one, whatever the number of ranks.
        mine = dist.shard(batches)
        results: dict[int, list[Sample]] = {}
        R = params.rows_per_prompt
        with packed_linears(self.model), tqdm(total=sum(map(len, mine)), desc=progress, unit="prompt",
                                              disable=progress is None or not dist.is_main()) as bar:
            for batch in mine:
                ids, done = decode_batch(self.model, [encoded[i] for i in batch], batch, params,
                                         self.stop_ids, self.pad_id)
                for b, i in enumerate(batch):
                    results[i] = [Sample(decode_response(self.tokenizer, ids[b * R + r], self.stop_ids),
                                         len(ids[b * R + r]), done[b * R + r]) for r in range(R)]
                bar.update(len(batch))
        results = dist.merged(results)
        return [results[i] for i in range(len(encoded))]


BACKENDS = ("hf", "vllm")


def build_generator(backend: str, model_path: str | Path, *, dtype: str, trust_remote_code: bool = False,
                    batch_size: int, device: str | None = None, tensor_parallel_size: int = 1,
                    gpu_memory_utilization: float = 0.9, enforce_eager: bool = False,
                    max_prompt_length: int | None = None, vllm_python: str | None = None) -> Generator:
    """A generation backend over a model folder. "hf" loads the model here (device: None picks CUDA
    when available; batch_size prompts per batch); "vllm" starts an engine on the folder for each
    `generate` call (selm/engines/vllm_backend.py; tensor_parallel_size, gpu_memory_utilization,
    enforce_eager, and the Python it runs under, vllm_python). Both cut prompts to max_prompt_length
    tokens as training does."""
    if backend not in BACKENDS:
        raise ValueError(f"generate.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "vllm":
        from selm.engines.vllm_backend import VLLMGenerator

        return VLLMGenerator(model_path, dtype=dtype, trust_remote_code=trust_remote_code,
                             tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                             enforce_eager=enforce_eager, max_prompt_length=max_prompt_length, python=vllm_python)
    from selm.models import default_device, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(Path(model_path), trust_remote_code)
    model = load_causal_lm(Path(model_path), dtype, trust_remote_code)
    if device is None:
        device = default_device()
    return HFGenerator(model.to(device), tokenizer, batch_size, max_prompt_length)


def generator_from_config(cfg: Config, model_path: str | Path, *, batch_size: int, cut_prompts: bool = True
                          ) -> Generator:
    """The generation engine of the generate, evaluate and mtbench stages over `model_path`: the
    generate section's backend and engine settings, in generate.dtype, with the caller's batch size;
    with cut_prompts, prompts longer than train.max_prompt_length are cut as training cuts them (the
    policy is trained on the prompt it answered)."""
    from selm.models import default_device
    from selm.precision import generation_dtype

    g = cfg.generate
    return build_generator(g.backend, model_path, dtype=generation_dtype(g.dtype, cfg.model.dtype, default_device()),
                           trust_remote_code=cfg.model.trust_remote_code, batch_size=batch_size,
                           tensor_parallel_size=g.tensor_parallel_size,
                           gpu_memory_utilization=g.vllm_gpu_memory_utilization, enforce_eager=g.vllm_enforce_eager,
                           max_prompt_length=cfg.train.max_prompt_length if cut_prompts else None,
                           vllm_python=g.vllm_python)


def generate_samples(model, tokenizer, prompts: Sequence[Messages | str], *, num_samples: int, temperature: float,
                     top_p: float, max_new_tokens: int, greedy: bool, batch_size: int, seed: int,
                     progress: str | None = None) -> list[list[Sample]]:
    """Samples (text, finished, ...), one list per prompt in input order: `num_samples` samples, or
    with greedy=True one greedy response (num_samples and temperature are then ignored)."""
    params = SamplingParams(num_samples=0 if greedy else num_samples, temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens, include_greedy=greedy, seed=seed)
    return HFGenerator(model, tokenizer, batch_size).generate(prompts, params, progress)


def generate(model, tokenizer, prompts: Sequence[Messages | str], **kwargs) -> list[list[str]]:
    """generate_samples, as text only."""
    return [[s.text for s in row] for row in generate_samples(model, tokenizer, prompts, **kwargs)]
