"""A full disk or an unwritable folder: one line naming the file, exit 2, nothing marked done, the
previous state intact, and the same command continues once the file can be written. Simulated by
failing the fsync of chosen files (CI runs as root, where a read-only mode bit does not stop writes)."""

import errno
import os
from pathlib import Path

import pytest

import selm.io
from helpers_cli import message_lines
from selm.cli import main
from test_loop import TINY


def fail_writes(monkeypatch, name_part: str, err: int) -> None:
    """Make every atomic write of a file whose name contains `name_part` fail with `err`."""
    real = os.fsync

    def fsync(fd):
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(err, os.strerror(err))
        return real(fd)

    monkeypatch.setattr(selm.io.os, "fsync", fsync)


def test_full_disk_mid_run_keeps_finished_stages_and_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    fail_writes(monkeypatch, "scores.jsonl", errno.ENOSPC)
    assert main(["run", str(TINY), "--output-dir", str(out)]) == 2
    lines = message_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "scores.jsonl" in lines[0] and "No space left on device" in lines[0], lines
    assert (out / "iter_1" / "generate" / "DONE.json").is_file()  # the finished stage is kept
    generations = (out / "iter_1" / "generate" / "generations.jsonl").read_bytes()
    assert not (out / "iter_1" / "rank" / "DONE.json").exists()
    assert not list(out.rglob("*.tmp"))
    monkeypatch.undo()  # room again
    assert main(["run", str(TINY), "--output-dir", str(out)]) == 0
    assert (out / "DONE.json").is_file()
    assert (out / "iter_1" / "generate" / "generations.jsonl").read_bytes() == generations  # not redone


def test_unwritable_run_folder_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    fail_writes(monkeypatch, "config.yaml", errno.EACCES)
    assert main(["run", str(TINY), "--output-dir", str(out)]) == 2
    lines = message_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "config.yaml" in lines[0] and "Permission denied" in lines[0], lines
    assert not (out / "config.yaml").exists() and not list(out.rglob("DONE.json"))


def test_other_os_errors_keep_their_traceback(tmp_path, monkeypatch):
    fail_writes(monkeypatch, "config.yaml", errno.EIO)
    with pytest.raises(OSError):
        main(["run", str(TINY), "--output-dir", str(tmp_path / "run")])
