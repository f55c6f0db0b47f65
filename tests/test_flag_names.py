"""Errors that name a config key also name the flag that sets it in the command at hand, so that a
near-miss flag (--judge-model for a reward model) is corrected by the error itself."""

from pathlib import Path

from selm.cli import main

PROMPTS = Path(__file__).resolve().parents[1] / "selm" / "data" / "tiny_prompts.jsonl"


def test_reward_model_judge_error_names_the_reward_model_flag(tmp_path, capsys):
    rc = main(["eval", "pairwise", "tiny", "--baseline", "tiny", "--prompts", str(PROMPTS), "--judge-kind",
               "reward_model", "--judge-model", "myrm", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("selm: error: pairwise.judge.model (--judge-reward-model): required when "
                               "pairwise.judge.kind (--judge-kind) is 'reward_model'")
    assert not (tmp_path / "out").exists()  # refused before any answer was generated


def test_train_errors_name_their_flags(tmp_path, capsys):
    assert main(["train", "--pairs", str(tmp_path / "p.jsonl"), "--lora-r", "-1", "--output-dir", str(tmp_path)]) == 2
    assert "train.lora.r (--lora-r): must be >= 0" in capsys.readouterr().err
    # A key set with --set in a command with no flag for it is named as it is.
    tiny = PROMPTS.parents[2] / "configs" / "tiny.yaml"
    assert main(["run", str(tiny), "--set", "data.prompts=", "--output-dir", str(tmp_path / "r")]) == 2
    assert "selm: error: data.prompts: required" in capsys.readouterr().err
