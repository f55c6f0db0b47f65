"""train.bf16: "auto" (selm/precision.py): bf16 autocast only where the hardware has it natively, so
the demo is not many times slower on a CPU that would emulate it. The CPU rule is tested with a
written /proc/cpuinfo and torch's own probes switched off."""

import json
from pathlib import Path

import pytest
import torch

from selm import precision
from selm.config import config_to_dict, load_config
from selm.environment import record_environment
from selm.precision import cpu_native_bf16, use_bf16
from selm.stages.train import run_train
from test_train import cfg, pairs_file  # noqa: F401 -- pairs_file is a fixture

EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
COOPER = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16 svebf16\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd atomics\n"


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Write a /proc/cpuinfo; torch's probes report nothing, so the file decides."""
    for name in precision._TORCH_PROBES:
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "CPUINFO", path)

    def write(text: str) -> None:
        path.write_text(text)
    return write


@pytest.mark.parametrize("text,native", [(EPYC, False), (SAPPHIRE, True), (COOPER, True), (GRAVITON3, True),
                                         (GRAVITON2, False), ("", False)])
def test_cpu_native_bf16_reads_the_flags(cpuinfo, text, native):
    cpuinfo(text)
    assert cpu_native_bf16() is native
    assert use_bf16("auto", "cpu") is native
    # An explicit setting is obeyed whatever the CPU.
    assert use_bf16(True, "cpu") is True and use_bf16(False, "cpu") is False


def test_no_cpuinfo_means_fp32_and_torchs_probe_counts(cpuinfo, monkeypatch):
    assert cpu_native_bf16() is False  # the file was never written: not Linux, no probe -> fp32
    monkeypatch.setattr(torch.cpu, precision._TORCH_PROBES[0], lambda: True, raising=False)
    assert cpu_native_bf16() is True


def test_auto_on_cuda_asks_torch(cpuinfo, monkeypatch):
    cpuinfo(SAPPHIRE)  # the CPU does not matter for a GPU run
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
        assert use_bf16("auto", "cuda:0") is supported
    assert use_bf16("auto", "meta") is False  # other devices: fp32 unless set true


def test_auto_is_a_config_value_and_the_demo_uses_it():
    assert load_config(None, ["train.bf16=auto"]).train.bf16 == "auto"
    assert load_config(None, ["train.bf16=true"]).train.bf16 is True
    demo = Path(__file__).parent.parent / "selm" / "configs" / "demo.yaml"
    assert load_config(demo).train.bf16 == "auto"


def _metrics(stage: Path) -> list[dict]:
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_auto_trains_as_the_setting_it_resolves_to(tmp_path, pairs_file, tiny_model_dir, cpuinfo, capsys):  # noqa: F811
    """auto on a CPU without bf16 trains exactly as false; with it, exactly as true; and says which."""
    runs = {}
    for name, text, setting in [("fp32", EPYC, "false"), ("auto_no", EPYC, "auto"),
                                ("bf16", SAPPHIRE, "true"), ("auto_yes", SAPPHIRE, "auto")]:
        cpuinfo(text)
        out = tmp_path / name
        run_train(cfg("train.batch_size=4", f"train.bf16={setting}"), pairs_file, tiny_model_dir, out)
        runs[name] = out
        assert json.loads((out / "DONE.json").read_text())["bf16"] is (name in ("bf16", "auto_yes"))
        if setting == "auto":
            want = "bf16 autocast" if text == SAPPHIRE else "fp32"
            assert f"train: train.bf16=auto: {want} (CPU bf16 instructions: " in capsys.readouterr().err
    assert _metrics(runs["auto_no"]) == _metrics(runs["fp32"])
    assert _metrics(runs["auto_yes"]) == _metrics(runs["bf16"])
    assert _metrics(runs["bf16"]) != _metrics(runs["fp32"])  # the check above could tell them apart


def test_environment_json_says_what_auto_means_here(tmp_path, cpuinfo):
    conf = config_to_dict(load_config(None, ["train.bf16=auto"]))
    cpuinfo(EPYC)
    record_environment(tmp_path / "a", conf)
    cpuinfo(SAPPHIRE)
    record_environment(tmp_path / "b", conf)
    (a,), (b,) = (json.loads((tmp_path / d / "environment.json").read_text()) for d in ("a", "b"))
    gpu = torch.cuda.is_available()
    assert (a["machine"]["cpu_native_bf16"], b["machine"]["cpu_native_bf16"]) == (False, True)
    if not gpu:
        assert (a["train_bf16"], b["train_bf16"]) == (False, True)
