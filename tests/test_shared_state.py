"""Which state is on disk is decided by the global main rank and broadcast: on a shared file system
with attribute caching another node may still see the folder as it was before the main rank's last
write. Here a fake rank 1 of 2 whose view of the folder lags behind rank 0's takes rank 0's branch."""

from pathlib import Path

import pytest

from selm import dist
from selm.io import ensure_stage, is_done_everywhere, mark_done


@pytest.fixture
def lagging_rank_1(monkeypatch):
    """Rank 1 of 2; `answers` holds what rank 0 broadcasts, in order; `asked` counts the broadcasts."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "barrier", lambda: None)
    state = {"answers": [], "asked": 0}

    def broadcast(obj):
        assert obj is None  # rank 1 sends nothing: it did not read the folder itself
        state["asked"] += 1
        return state["answers"].pop(0)

    monkeypatch.setattr(dist, "broadcast", broadcast)
    return state


def test_a_stage_done_on_the_main_rank_is_not_rebuilt_by_a_rank_that_does_not_see_its_marker(lagging_rank_1, tmp_path):
    stage = tmp_path / "pair"
    stage.mkdir()  # rank 1 sees the folder without DONE.json
    lagging_rank_1["answers"] = [True, {"pairs": 12}]  # rank 0: done; its marker

    def build(sd: Path):
        raise AssertionError("rebuilt on rank 1 alone")

    assert ensure_stage(stage, build) == {"pairs": 12}
    assert lagging_rank_1["asked"] == 2 and not (stage / "DONE.json").exists()


def test_a_stage_not_done_on_the_main_rank_is_built_by_a_rank_that_sees_an_old_marker(lagging_rank_1, tmp_path):
    stage = tmp_path / "train"
    mark_done(stage, {"steps": 1})  # rank 1 still sees the marker the main rank has just removed
    lagging_rank_1["answers"] = [False, {"steps": 4}]
    built = []
    assert ensure_stage(stage, built.append, resume=True) == {"steps": 4}
    assert built == [stage]


def test_the_next_iteration_starts_when_the_main_rank_sees_the_previous_one_done(lagging_rank_1, tmp_path):
    from selm.config import Config
    from selm.loop import model_for_iteration

    lagging_rank_1["answers"] = [True]
    assert model_for_iteration(Config(), tmp_path, 2) == tmp_path / "iter_1" / "train" / "model"
    lagging_rank_1["answers"] = [False]
    mark_done(tmp_path / "iter_1" / "train")  # seen here, not on the main rank: still not finished
    with pytest.raises(Exception, match="not finished; iteration 2 starts from iteration 1's model"):
        model_for_iteration(Config(), tmp_path, 2)


def test_one_process_reads_the_folder_itself(tmp_path):
    assert not is_done_everywhere(tmp_path)
    mark_done(tmp_path)
    assert is_done_everywhere(tmp_path)
