"""What the generation engines are started with, checked without a GPU and without vLLM: the vLLM
engine's memory share from what is free, one line when it cannot start for memory, generate.dtype
reaching both backends, prompts cut as training cuts them, and max_model_len within the model's
context. The vLLM engine process runs here in-process against a stand-in `vllm` module that records
the arguments it is given."""

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from selm.config import load_config
from selm.engines import vllm_backend
from selm.engines.sampling import SamplingParams, encode_for_generation
from selm.engines.vllm_backend import GiB, engine_memory
from selm.io import InputError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
LONG_PROMPT = [{"role": "user", "content": "word " * 200 + "the question at the end?"}]


# --------------------------------------------------------------------------------------------
# Memory


def test_gpu_share_is_lowered_to_what_is_free():
    total = 80 * GiB
    assert engine_memory("cuda", 0.9, total, total) == {"gpu_memory_utilization": 0.9}
    # A training stage before it left 60 of 80 GiB in use: 0.9 x 80 would not start.
    share = engine_memory("cuda", 0.9, 20 * GiB, total)["gpu_memory_utilization"]
    assert 0 < share * total <= 20 * GiB - GiB
    with pytest.raises(InputError) as e:
        engine_memory("cuda", 0.9, GiB // 2, total)
    assert str(e.value).startswith("generate.vllm_gpu_memory_utilization: ") and "\n" not in str(e.value)


def test_cpu_kv_cache_is_sized_from_available_ram():
    # This VM's figures when vLLM-CPU's default share (0.92 of all RAM) refused to start.
    free, total = int(20.51 * GiB), int(23.54 * GiB)
    args = engine_memory("cpu", 0.9, free, total, env={})
    # An explicit KV cache size: vLLM-CPU then skips its "0.92 of all RAM" check.
    assert set(args) == {"kv_cache_memory_bytes"} and 0 < args["kv_cache_memory_bytes"] <= free // 2
    small = engine_memory("cpu", 0.9, 3 * GiB, total, env={})["kv_cache_memory_bytes"]
    assert small <= (3 * GiB - vllm_backend.memory_margin(total)) // 2
    assert engine_memory("cpu", 0.9, free, total, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) == {}  # vLLM applies it
    with pytest.raises(InputError, match="^VLLM_CPU_KVCACHE_SPACE: "):
        engine_memory("cpu", 0.9, GiB, total, env={})


class _Conn:
    def __init__(self):
        self.sent = []

    def send(self, obj):
        self.sent.append(obj)

    def close(self):
        pass


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` module whose LLM records its arguments (and raises `calls["raise"]` if set) and
    answers every request with two tokens; the platform is the CPU."""
    calls = {"raise": None}

    class LLM:
        def __init__(self, **kwargs):
            calls["kwargs"] = kwargs
            if calls["raise"] is not None:
                raise calls["raise"]
            self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=lambda: None))

        def generate(self, prompts, params, use_tqdm=False):
            calls["prompts"] = prompts
            out = types.SimpleNamespace(token_ids=[5, 6], finish_reason="length")
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    platform = types.SimpleNamespace(is_unspecified=lambda: False, is_cuda_alike=lambda: False, is_cpu=lambda: True)
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, lambda **kw: kw
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = platform
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(vllm_backend, "_free_memory", lambda device: (int(20.51 * GiB), int(23.54 * GiB)))
    return calls


SPEC = {"model": "m", "dtype": "bfloat16", "trust_remote_code": False, "max_model_len": 64, "tensor_parallel_size": 1,
        "enforce_eager": True, "gpu_memory_utilization": 0.9, "stop_ids": [2], "progress": False}


def test_engine_process_starts_with_the_dtype_and_a_kv_cache_from_free_ram(fake_vllm):
    conn = _Conn()
    vllm_backend._engine_main(conn, SPEC, [([[1, 2, 3]], [{"temperature": 0.0, "top_p": 1.0, "max_tokens": 2,
                                                          "seed": None}])])
    assert conn.sent[0][0] == "ok", conn.sent
    kw = fake_vllm["kwargs"]
    assert kw["dtype"] == "bfloat16" and kw["max_model_len"] == 64
    assert 0 < kw["kv_cache_memory_bytes"] <= int(20.51 * GiB) // 2


def test_engine_memory_failure_is_one_line_naming_the_setting(fake_vllm):
    fake_vllm["raise"] = ValueError("Available memory on node 0 (20.51/23.54 GiB) on startup is less than desired "
                                    "CPU memory utilization (0.92, 21.66 GiB).\nOn the CPU backend, ...")
    conn = _Conn()
    vllm_backend._engine_main(conn, SPEC, [])
    kind, message, _ = conn.sent[0]
    assert kind == "input" and "\n" not in message
    assert message.startswith("InputError: VLLM_CPU_KVCACHE_SPACE: ") and "20.51/23.54 GiB" in message
    # On a GPU the line names the share to lower.
    gpu = vllm_backend.start_failure(ValueError("Free memory on device (10.2/79.1 GiB) on startup is less than desired "
                                                "GPU memory utilization (0.9, 71.2 GiB)."), "cuda")
    assert str(gpu).startswith("generate.vllm_gpu_memory_utilization: lower it") and "10.2/79.1 GiB" in str(gpu)
    # Any other failure keeps its traceback (kind "error").
    fake_vllm["raise"] = ValueError("unknown architecture")
    conn = _Conn()
    vllm_backend._engine_main(conn, SPEC, [])
    assert conn.sent[0][0] == "error"


# --------------------------------------------------------------------------------------------
# generate.dtype


@pytest.fixture
def engines(monkeypatch):
    """Records the dtype each backend receives: the "hf" backend's model load and the spec the
    "vllm" backend's engine process would get (the engine itself is a stand-in)."""
    from selm import models

    seen = {}
    real_load = models.load_causal_lm

    def load(path, dtype="float32", *args, **kwargs):
        seen["hf"] = dtype
        return real_load(path, dtype, *args, **kwargs)

    def engine(spec, jobs, seconds=None):
        seen["vllm"] = spec
        return [[([2], "stop") for _ in rows] for rows, _ in jobs]

    monkeypatch.setattr(models, "load_causal_lm", load)
    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: True)
    monkeypatch.setattr(vllm_backend, "run_engine", engine)
    return seen


def _prompts(tmp_path, rows):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_id": str(i), "prompt": p}) + "\n" for i, p in enumerate(rows)))
    return path


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_generate_dtype_reaches_both_backends(engines, backend, tmp_path, tiny_model_dir, monkeypatch):
    from selm import precision
    from selm.stages.generate import run_generate

    prompts = _prompts(tmp_path, [[{"role": "user", "content": "hi"}]])
    # "auto": bf16 where the CPU has bf16 instructions, else the weights' dtype.
    for setting, native, want in (("bfloat16", False, "bfloat16"), ("auto", False, "float32"),
                                  ("auto", True, "bfloat16"), ("float16", True, "float16")):
        monkeypatch.setattr(precision, "native_bf16", lambda device, native=native: native)
        cfg = load_config(TINY, overrides=[f"generate.backend={backend}", f"generate.dtype={setting}",
                                           "generate.max_new_tokens=2", "generate.num_samples=1"])
        run_generate(cfg, tiny_model_dir, prompts, tmp_path / f"{backend}-{setting}-{native}", seed=0)
        got = engines[backend] if backend == "hf" else engines["vllm"]["dtype"]
        assert got == want, (setting, native)


def test_auto_dtype_is_bf16_where_the_device_has_it(monkeypatch):
    import torch

    from selm import precision

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for cpu_bf16, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(precision, "cpu_native_bf16", lambda v=cpu_bf16: v)
        assert precision.generation_dtype("auto", "float32", "cpu") == want
        assert precision.generation_dtype("auto", "float32", gpu) == "bfloat16"
        assert precision.generation_dtype("float16", "float32", gpu) == "float16"
        assert precision.generation_dtype("float32", "float32", "cpu") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.generation_dtype("auto", "float32", gpu) == "float32"


def test_evaluate_generates_in_the_generate_dtype(engines, tmp_path, tiny_model_dir):
    from selm.stages.evaluate import run_evaluate

    prompts = _prompts(tmp_path, [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]])
    cfg = load_config(TINY, overrides=["generate.backend=vllm", "generate.dtype=bfloat16", "evaluate.max_new_tokens=2"])
    run_evaluate(cfg, tiny_model_dir, prompts, tmp_path / "eval")
    assert engines["vllm"]["dtype"] == "bfloat16"


def test_generate_dtype_is_validated():
    from selm.config import ConfigError

    with pytest.raises(ConfigError, match="generate.dtype"):
        load_config(TINY, overrides=["generate.dtype=fp8"])
    from selm.config import Config

    assert Config().generate.dtype == "auto"
    assert load_config(TINY).generate.dtype == "float32"  # the tiny config: the same tokens on every CPU


# --------------------------------------------------------------------------------------------
# Long prompts


def test_generation_cuts_prompts_as_training_does(tiny_model_dir):
    from selm.data import PairRecord
    from selm.models import load_tokenizer
    from selm.objective.logprobs import tokenize_pairs

    tok = load_tokenizer(tiny_model_dir)
    full = encode_for_generation(tok, [LONG_PROMPT])[0]
    pair = PairRecord(prompt_id="p", prompt=LONG_PROMPT, chosen="a", rejected="b")
    trained = tokenize_pairs(tok, [pair], max_length=128, max_prompt_length=64, with_exploration=False)[0].prompt
    generated = encode_for_generation(tok, [LONG_PROMPT], max_prompt_length=64)[0]
    assert len(full) > 64 and generated == trained == full[-64:]


def test_both_backends_generate_from_the_cut_prompt(engines, tmp_path, tiny_model_dir, monkeypatch):
    from selm.engines import generation
    from selm.models import load_tokenizer
    from selm.stages.generate import run_generate

    seen = []
    real = generation.decode_batch
    monkeypatch.setattr(generation, "decode_batch", lambda model, ids, *a, **k: seen.append(ids) or real(model, ids, *a, **k))
    prompts = _prompts(tmp_path, [LONG_PROMPT])
    want = encode_for_generation(load_tokenizer(tiny_model_dir), [LONG_PROMPT], max_prompt_length=64)[0]
    for backend in ("hf", "vllm"):
        cfg = load_config(TINY, overrides=[f"generate.backend={backend}", "generate.max_new_tokens=2",
                                           "generate.num_samples=1"])
        assert cfg.train.max_prompt_length == 64
        run_generate(cfg, tiny_model_dir, prompts, tmp_path / backend, seed=0)
    assert seen[0] == [want]
    assert engines["vllm"]["max_model_len"] == 64 + 2


def test_max_model_len_never_exceeds_the_model_context(engines, tmp_path, tiny_model_dir):
    from selm.engines.vllm_backend import VLLMGenerator, max_model_len

    assert max_model_len(100, 50, None) == 150
    assert max_model_len(100, 50, 4096) == 150
    assert max_model_len(4000, 256, 4096) == 4096  # Phi-3-4k with a 4,000-token prompt
    with pytest.raises(InputError, match="context of 4096 tokens"):
        max_model_len(4096, 16, 4096)
    # From the folder's config.json, through a generate call with nothing cut.
    from selm.models import load_tokenizer

    n = len(encode_for_generation(load_tokenizer(tiny_model_dir), [LONG_PROMPT])[0])
    model = tmp_path / "short-context"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = n + 50
    (model / "config.json").write_text(json.dumps(config))
    gen = VLLMGenerator(model, dtype="float32")
    gen.generate([LONG_PROMPT], SamplingParams(num_samples=0, include_greedy=True, max_new_tokens=100))
    assert engines["vllm"]["max_model_len"] == n + 50
