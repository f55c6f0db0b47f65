"""The `selm` command: help documents every option, bad input is one line + exit 2, and
`selm train` on a pairs file writes a checkpoint that transformers loads."""

import json
import subprocess
import sys

import pytest

from selm.cli import build_parser, main
from selm.config import TrainConfig, describe_options


def test_train_help_documents_every_train_and_model_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for key, _, _, doc in describe_options():
        section, name = key.split(".", 1) if "." in key else ("", key)
        if section == "train":
            assert f"--{name.replace('_', '-').replace('.', '-')}" in text, name  # train.lora.r: --lora-r
            assert doc.split()[0] in text
    for flag in ("--pairs", "--ref-model", "--output-dir", "--model", "--set"):
        assert flag in text


def test_train_command_writes_a_loadable_checkpoint(tmp_path, tiny_model_dir, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "good answer", "rejected": "bad",
                                         "exploration": "meh"}) + "\n" for i in range(4)))
    rc = main(["train", "--pairs", str(pairs), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "out"),
               "--alpha", "0.001", "--beta", "0.1", "--learning-rate", "1e-3", "--batch-size", "2",
               "--set", "train.tensorboard=false"])
    assert rc == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "model")
    assert model.config.vocab_size == len(tok)
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "alpha: 0.001" in saved and "learning_rate: 0.001" in saved


def test_nested_lora_keys_are_flags_of_train(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "good", "rejected": "bad", "exploration": "meh"})
                             + "\n" for i in range(4)))
    rc = main(["train", "--pairs", str(pairs), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "out"),
               "--lora-r", "2", "--lora-target-modules", "[q_proj, v_proj]", "--lora-keep-adapter", "true",
               "--set", "train.tensorboard=false"])
    assert rc == 0
    adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("argv,message", [
    (["train", "--pairs", "MISSING.jsonl", "--output-dir", "OUT"], "selm: error: MISSING.jsonl: file not found"),
    (["train", "--pairs", "P", "--output-dir", "OUT", "--alpha", "-1"], "selm: error: train.alpha (--alpha): must be >= 0"),
    (["train", "--pairs", "P", "--output-dir", "OUT", "--set", "train.bogus=1"], "selm: error: train.bogus: unknown key"),
    (["status", "NOWHERE"], "selm: error: NOWHERE: not a selm run folder"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "P").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "exploration": "d"}) + "\n")
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith(message) and "\n" not in err, err
    assert not (tmp_path / "OUT" / "model").exists()


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "selm.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("selm ")
    sub = build_parser()._subparsers._group_actions[0].choices
    assert {"run", "generate", "rank", "pair", "train", "evaluate", "status", "options"} <= set(sub)


@pytest.mark.parametrize("failure", [RuntimeError("boom in a collective"), None])
def test_a_failing_rank_exits_without_tearing_down_the_process_group(monkeypatch, capsys, failure):
    """Under a launcher (world size 2) a rank whose command raises leaves with exit status 1 and its
    traceback, through os._exit, WITHOUT destroying the process group (its peers may be waiting in
    a collective: destroying it hangs them). A rank that finished leaves the group as before."""
    from selm import cli, dist

    class Exited(Exception):
        pass

    def exit_now(rc):
        raise Exited(rc)

    closed = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "close", lambda: closed.append(True))
    monkeypatch.setattr(cli.os, "_exit", exit_now)

    def dispatch(args):
        if failure is not None:
            raise failure
        return 0

    monkeypatch.setattr(cli, "_dispatch", dispatch)
    with pytest.raises(Exited) as e:
        main(["status", "/nonexistent"])
    if failure is None:
        assert e.value.args == (0,) and closed == [True]
    else:
        assert e.value.args == (1,) and closed == []
        assert "RuntimeError: boom in a collective" in capsys.readouterr().err
