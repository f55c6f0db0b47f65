"""The "Python API" snippet of docs/configuration.md, exactly as printed there, runs on the tiny
config and does what its comments say; the model folder it writes is a plain Hugging Face folder."""

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"


def _snippet() -> str:
    text = DOC.read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_snippet_runs(tmp_path, monkeypatch, capsys):
    # The snippet's paths are relative to the repository root; run it in a copy of the files it names.
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "tiny.yaml", tmp_path / "configs" / "tiny.yaml")
    (tmp_path / "selm" / "data").mkdir(parents=True)
    shutil.copy(ROOT / "selm" / "data" / "tiny_prompts.jsonl", tmp_path / "selm" / "data" / "tiny_prompts.jsonl")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_snippet(), str(DOC), "exec"), scope)

    summary, cfg = scope["summary"], scope["cfg"]
    assert [r["iteration"] for r in summary["iterations"]] == [0, 1]
    last = summary["iterations"][-1]
    assert last["pairs"] > 0 and 0 <= last["win_rate_vs_start"] <= 1
    assert str(last) in capsys.readouterr().out
    run = tmp_path / "runs" / "tiny-api"
    assert (run / "DONE.json").is_file() and (run / "iter_1" / "train" / "DONE.json").is_file()
    # Calling it again resumes: nothing to redo, the same summary.
    from selm.config import load_config
    from selm.loop import preflight, run_loop

    assert run_loop(load_config("configs/tiny.yaml", ["loop.iterations=1", "train.alpha=0.01"]), run) == summary
    # The config built in code is a complete, runnable one.
    assert cfg.train.alpha == 1e-3 and cfg.rank.callable == "selm.toy_judges:letters_ranker"
    preflight(cfg)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "iter_1" / "train" / "model")
    assert model.num_parameters() > 0
