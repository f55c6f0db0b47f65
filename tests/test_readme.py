"""The README's "Your own data and model" example runs as printed: its config and judge file are
written where their first lines say, the built-in tiny model is saved as its `my-sft-model` folder
and the shipped tiny prompts as its `prompts.jsonl`; then its three commands run. Only the lengths
are cut (`--set`), since the tiny model's answers are random bytes. The functions of the judge file
score the candidates and the held-out answers."""

import importlib.util
import json
import re
import shlex
import shutil
from pathlib import Path

from selm.cli import main
from selm.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
# The random-init tiny model's greedy answer is empty (configs/tiny.yaml): sampled held-out answers
# give the gold judge something to score.
SMALL = ["generate.max_new_tokens=16", "evaluate.max_new_tokens=16", "train.max_length=128",
         "train.max_prompt_length=64", "evaluate.bootstrap_samples=200", "evaluate.temperature=1.0"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own data and model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


def test_the_own_data_and_model_example_runs_as_printed(tmp_path, monkeypatch, capsys):
    blocks = _blocks()
    assert [lang for lang, _ in blocks] == ["yaml", "python", "bash"]
    for _, body in blocks[:2]:
        path = tmp_path / re.match(r"# (\S+)", body).group(1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    mine = tmp_path / "mine"
    save_tiny(mine / "my-sft-model")
    shutil.copy(ROOT / "selm" / "data" / "tiny_prompts.jsonl", mine / "prompts.jsonl")
    monkeypatch.chdir(tmp_path)
    commands = [shlex.split(line.split("#")[0]) for line in blocks[2][1].splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["selm", "run"], ["selm", "status"], ["selm", "report"]]

    smaller = [arg for key in SMALL for arg in ("--set", key)]
    assert main(commands[0][1:] + smaller) == 0
    run = tmp_path / "runs" / "mine"
    assert json.loads((run / "DONE.json").read_text())
    assert (run / "iter_2" / "train" / "model" / "model.safetensors").is_file()
    # The two functions of the file next to the config scored the candidates and the held-out answers.
    spec = importlib.util.spec_from_file_location("readme_myjudges", mine / "myjudges.py")
    judges = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(judges)
    for t in (1, 2):
        rows = _jsonl(run / f"iter_{t}" / "rank" / "scores.jsonl")
        assert rows and all(r["scores"] == judges.ranker(r["prompt"], r["candidates"]) for r in rows)
    held_out = _jsonl(run / "iter_2" / "evaluate" / "generations.jsonl")
    assert len(held_out) == 16 and any(g["response"] for g in held_out)
    assert all(g["gold"] == judges.gold(g["prompt"], [g["response"]])[0] for g in held_out)
    capsys.readouterr()

    assert main(commands[1][1:]) == 0
    assert "done" in capsys.readouterr().out
    assert main(commands[2][1:]) == 0
    assert (run / "report.md").is_file() and (run / "report.json").is_file()
