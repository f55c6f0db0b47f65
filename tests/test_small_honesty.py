"""Small things a report or a command said that were not quite so: an answer's length is the tokens
the model generated (not its text tokenised again, which a byte-level tokenizer can make longer
than evaluate.max_new_tokens); `selm status` on a missing folder names every command that makes
one; `selm study --help` says where its folder goes."""

import json

from selm.cli import build_parser, main
from selm.config import load_config
from selm.io import atomic_write_jsonl, read_jsonl
from test_loop import TINY


def test_answer_lengths_are_the_generated_tokens(tmp_path, tiny_model_dir):
    from selm.stages.evaluate import run_evaluate

    cfg = load_config(TINY, ["evaluate.max_new_tokens=16", "evaluate.temperature=1.0"])
    prompts = tmp_path / "prompts.jsonl"
    atomic_write_jsonl(prompts, [{"prompt_id": f"p{i}", "prompt": f"Say something about topic {i}."} for i in range(12)])
    run_evaluate(cfg, tiny_model_dir, prompts, tmp_path / "ev", seed=0)
    rows = read_jsonl(tmp_path / "ev" / "generations.jsonl")
    assert all(0 <= r["length_tokens"] <= 16 for r in rows)
    assert all(r["length_tokens"] == 16 for r in rows if not r["finished"])  # cut at the cap: exactly the cap
    done = json.loads((tmp_path / "ev" / "DONE.json").read_text())
    assert done["tokens"] == sum(r["length_tokens"] for r in rows)


def test_status_of_a_missing_folder_names_every_command_that_makes_one(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    for command in ("selm run", "selm train", "selm demo", "selm sweep", "selm study"):
        assert command in err


def test_study_help_says_where_its_folder_goes():
    study = build_parser()._subparsers._group_actions[0].choices["study"]
    assert "runs/<preset or study file name> for study" in " ".join(study.format_help().split())
