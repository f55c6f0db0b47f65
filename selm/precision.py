"""Whether bf16 autocast pays off on a device: what `train.bf16: auto` resolves to.

bf16 autocast halves activation memory and is faster where the hardware multiplies bf16 natively: a
CUDA GPU that supports it, or a CPU with AMX-BF16 / AVX512-BF16 (x86) or the BF16 extension (Arm).
Elsewhere a CPU emulates bf16 matmuls, many times slower than fp32 (BENCHMARKS.md, "bf16 on a CPU
without bf16 instructions"), so "auto" keeps fp32 there.
"""

from __future__ import annotations

from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
# x86 flags (Linux spelling) and the Arm feature name that mean native bf16 dot products.
_CPU_BF16_FLAGS = {"amx_bf16", "avx512_bf16", "bf16"}
# torch's own (private, so looked up defensively) probes of the same instructions, when it has them.
_TORCH_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def cpu_native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively: torch's probe says so, or /proc/cpuinfo lists one
    of the flags (Linux; elsewhere with no torch probe: False, the safe answer)."""
    for name in _TORCH_PROBES:
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:
            pass
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 | aarch64; every core lists the same set
            return bool(_CPU_BF16_FLAGS & set(value.split()))
    return False


def use_bf16(setting: bool | str, device) -> bool:
    """`train.bf16` for `device`: true/false as given; "auto": bf16 where the device has it natively."""
    if setting != "auto":
        return bool(setting)
    return native_bf16(device)  # other accelerators: fp32, correct everywhere; set true to opt in


def describe(setting: bool | str, device) -> str:
    """One line for logs: what `train.bf16` means on `device` and why."""
    chosen = "bf16 autocast" if use_bf16(setting, device) else "fp32"
    if setting != "auto":
        return f"train.bf16={str(setting).lower()}: {chosen}"
    kind = torch.device(device).type
    why = {"cuda": "GPU bf16 support", "cpu": "CPU bf16 instructions"}.get(kind, f"device {kind}")
    have = use_bf16(setting, device)
    return f"train.bf16=auto: {chosen} ({why}: {'yes' if have else 'no'})"


def native_bf16(device) -> bool:
    """Whether `device` multiplies bf16 natively (a CUDA GPU that supports it, a CPU with bf16
    instructions); other accelerators: False."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return cpu_native_bf16()
    return False


def generation_dtype(setting: str, weights_dtype: str, device) -> str:
    """`generate.dtype` for `device`: a dtype name as given; "auto": "bfloat16" where the device
    multiplies bf16 natively (a CUDA GPU that has it -- what the SELM authors generate in -- or a CPU
    with bf16 instructions: 1.75x fp32's samples/s at the demo's settings on a 2-core AMD EPYC with
    AVX512-BF16, BENCHMARKS.md), else the weights' own dtype (emulated bf16 is many times slower)."""
    if setting != "auto":
        return setting
    return "bfloat16" if native_bf16(device) else weights_dtype


def autocast_dtype(setting: bool | str, device) -> torch.dtype | None:
    """The dtype forwards on `device` autocast to under `train.bf16` (None: the weights' own). What
    scores log-probs to compare with training's uses it too."""
    return torch.bfloat16 if use_bf16(setting, device) else None
