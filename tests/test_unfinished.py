"""Responses cut at max_new_tokens: flagged by generate, penalised by pair, trained without an end of turn."""

import json

import pytest

from selm.chat import end_of_turn_ids
from selm.config import ConfigError, load_config
from selm.data import PairRecord, load_pairs
from selm.io import InputError
from selm.objective.logprobs import tokenize_pairs
from selm.stages.pair import pair_record, run_pair
from selm.tiny import build_tiny_tokenizer

PROMPT = [{"role": "user", "content": "q"}]
REC = {"prompt_id": "a", "prompt": PROMPT, "candidates": ["short.", "long and cut", "mid."],
       "sources": ["sample", "sample", "greedy"], "finished": [True, False, True],
       "exploration": "mid.", "exploration_finished": True, "scores": [0.2, 0.9, 0.5]}


def test_penalty_moves_a_cut_off_winner_down_and_flags_travel():
    plain = pair_record(REC, 0.0)
    assert plain["chosen"][0]["content"] == "long and cut" and plain["finished_chosen"] is False
    assert plain["finished_rejected"] is True and plain["finished_exploration"] is True
    fixed = pair_record(REC, 0.0, missing_eos_penalty=1.0)
    # 0.9 - 1.0 = -0.1 is now the worst; the best finished one (0.5) is chosen.
    assert fixed["chosen"][0]["content"] == "mid." and fixed["rejected"][0]["content"] == "long and cut"
    assert (fixed["score_chosen"], fixed["score_rejected"]) == (0.5, 0.9)  # raw ranker scores kept
    assert fixed["finished_rejected"] is False
    # The tie test uses penalised scores: 0.9 - 0.4 = 0.5 ties with 0.5, 0.2 is still below.
    assert pair_record({**REC, "scores": [0.5, 0.9, 0.5]}, 0.0, missing_eos_penalty=0.4) is None


def test_pair_stage_counts_and_checks_flags(tmp_path):
    scores = tmp_path / "scores.jsonl"
    scores.write_text(json.dumps(REC) + "\n")
    stats = run_pair(scores, tmp_path / "pair", min_margin=0.0, missing_eos_penalty=1.0)
    assert stats["unfinished_candidates"] == 1 and stats["unfinished_chosen"] == 0
    assert stats["unfinished_rejected"] == 1
    pairs = load_pairs(tmp_path / "pair" / "pairs.jsonl", need_exploration=True)
    assert pairs[0].finished == (True, False, True)
    scores.write_text(json.dumps({**REC, "finished": [True, "no", True]}) + "\n")
    with pytest.raises(InputError, match=r"scores.jsonl:1: field 'finished': expected one true/false per candidate"):
        run_pair(scores, tmp_path / "pair2", min_margin=0.0)
    assert not (tmp_path / "pair2").exists()


def test_pairs_file_flag_must_be_boolean(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "finished_chosen": "yes"}) + "\n")
    with pytest.raises(InputError, match=r"pairs.jsonl:1: field 'finished_chosen': expected true or false"):
        load_pairs(path, need_exploration=False)


def test_unfinished_responses_get_no_end_of_turn_token():
    tok = build_tiny_tokenizer()
    eot = set(end_of_turn_ids(tok))
    pair = PairRecord(PROMPT, "done.", "cut off in the mid", "also cut", finished=(True, False, False))
    ex = tokenize_pairs(tok, [pair], max_length=200, max_prompt_length=100, with_exploration=True)[0]
    assert ex.responses[0][-1] in eot
    for r in ex.responses[1:]:
        assert not eot & set(r)
    assert tok.decode(ex.responses[1]) == "cut off in the mid"


def test_penalty_config_is_checked(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("pair:\n  missing_eos_penalty: 1.0\n")
    assert load_config(y).pair.missing_eos_penalty == 1.0
    with pytest.raises(ConfigError, match="pair.missing_eos_penalty: must be >= 0"):
        load_config(y, ["pair.missing_eos_penalty=-1"])
