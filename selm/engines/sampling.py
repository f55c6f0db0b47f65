"""What every generation backend shares: the sampling settings (`SamplingParams`), the result type
(`Sample`), the backend interface (`Generator`), the prompt encoding, and the counter-based random
streams that make sample j of prompt i the same whatever the backend batches (generation.py decodes
with them; vllm_backend.py derives its per-request seeds from them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol, Sequence

import torch

from selm.chat import Messages, encode_prompt, normalize_prompt, truncate_prompt
from selm.config import check_sampling


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    num_samples: int = 1
    """Sampled responses per prompt (temperature/top_p); 0 for none."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int
    include_greedy: bool = False
    """Also return one greedy response per prompt, after the samples (it shares their prefill)."""
    seed: int = 0

    def __post_init__(self):
        check_sampling("", num_samples=self.num_samples, temperature=self.temperature, top_p=self.top_p,
                       max_new_tokens=self.max_new_tokens, sampled_by="num_samples > 0" if self.num_samples else None)
        if self.num_samples + self.include_greedy == 0:
            raise ValueError("num_samples: must be >= 1 unless include_greedy")

    @property
    def rows_per_prompt(self) -> int:
        return self.num_samples + int(self.include_greedy)


class Sample(NamedTuple):
    text: str
    """The decoded response, cut before the end-of-turn token."""
    num_tokens: int
    """Generated tokens, end-of-turn token excluded."""
    finished: bool
    """True if the model ended its turn; False if max_new_tokens cut it."""


class Generator(Protocol):
    def generate(self, prompts: Sequence[Messages | str], params: SamplingParams,
                 progress: str | None = None) -> list[list[Sample]]:
        """One list per prompt, in input order: params.num_samples samples, then the greedy one."""
        ...


# --------------------------------------------------------------------------------------------
# Counter-based random numbers: a stateless function of integer keys, vectorised over rows.

_M64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    c &= _M64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MUL1, _MUL2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; mask off the copied sign bits for a logical shift.
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2**64)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def stream_keys(seed: int, prompt_index: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """One key per row, from (seed, original prompt index, sample index). Shape: (N,) int64."""
    s = mix64(torch.tensor(_i64(seed), dtype=torch.int64))
    return mix64(mix64(s ^ prompt_index) ^ sample_index)


def uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """A uniform in [0, 1) per row for decoding step `step`. Shape: (N,) float64 (53 random bits)."""
    bits = _shr(mix64(keys ^ step), 11)
    return bits.to(torch.float64) * (2.0 ** -53)


def encode_for_generation(tokenizer, prompts: Sequence[Messages | str],
                          max_prompt_length: int | None = None) -> list[list[int]]:
    """Chat-template token ids of each prompt (with the assistant generation prompt), cut as
    training cuts them when max_prompt_length is given (chat.truncate_prompt)."""
    return [truncate_prompt(encode_prompt(tokenizer, normalize_prompt(p, where=f"prompts[{i}]")), max_prompt_length)
            for i, p in enumerate(prompts)]
