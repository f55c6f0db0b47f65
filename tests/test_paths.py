"""Values from a config or a data file never make selm write outside the run folder. prompt_ids are
never used to build a file name; model names and GGUF files are only read (a conversion goes to the
model cache under the file's own base name); iterations are range-checked before any folder is made
(tests/test_bad_input.py); the study arms' names are selm's own. Here a whole run whose prompt_ids are
relative and absolute paths writes nothing but its own folder."""

import json
import subprocess
from pathlib import Path

import pytest

from test_loop import ROOT, TINY, env, selm_cmd


@pytest.mark.slow
def test_path_like_prompt_ids_write_nothing_outside_the_run_folder(tmp_path):
    outside = tmp_path / "abs"  # where an absolute prompt_id points
    ids = ["../../evil", "..", "../evil/", "/", str(outside / "evil"), "a/../../../b", "~/evil", ".", "iter_1", "DONE.json"]
    rows = [json.loads(line) for line in (ROOT / "selm" / "data" / "tiny_prompts.jsonl").read_text().splitlines()]
    # Every prompt gets a path-like id, so every slice (train and held-out) carries them into every stage.
    rows = [{**r, "prompt_id": f"{ids[i % len(ids)]}{'' if i < len(ids) else i}"} for i, r in enumerate(rows)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    box, cwd = tmp_path / "box", tmp_path / "cwd"
    out = box / "deep" / "run"
    cwd.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    e = {**env(), "HOME": str(home), "SELM_CACHE": str(tmp_path / "cache")}
    for argv in (["run", TINY, "--output-dir", out, "--set", f"data.prompts={prompts}", "--set", "loop.iterations=1"],
                 ["report", out], ["status", out]):
        proc = subprocess.run(selm_cmd(*argv), cwd=cwd, env=e, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    gens = [json.loads(line) for line in (out / "iter_1" / "generate" / "generations.jsonl").read_text().splitlines()]
    assert {g["prompt_id"] for g in gens} & set(ids)  # the ids went through unchanged
    assert (out / "report.md").is_file() and (out / "DONE.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box", "cwd", "home", "prompts.jsonl"]
    assert [p.relative_to(box) for p in box.rglob("*") if out not in (p, *p.parents)] == [Path("deep")]
    assert not list(cwd.iterdir())
    # Only matplotlib's own font cache (the report's plots) in the home folder; no "~/evil".
    assert {p.relative_to(home).parts[:2] for p in home.rglob("*") if p.is_file()} <= {(".cache", "matplotlib")}
