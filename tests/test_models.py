"""Model materialisation (selm/models.py): the GGUF conversion cache survives a killed conversion."""

import threading
import time

from selm import models


def _fake_convert(calls):
    def convert(gguf, dest, dtype="float32"):
        calls.append(dest)
        time.sleep(0.2)  # long enough for a second caller to arrive while this one converts
        with models.AtomicDir(dest) as tmp:
            (tmp / "config.json").write_text("{}")
        return dest
    return convert


def test_conversion_removes_a_killed_runs_temporary_and_runs_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SELM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []
    monkeypatch.setattr(models, "convert_gguf", _fake_convert(calls))
    dest_parent = tmp_path / "cache" / "models"
    dest_parent.mkdir(parents=True)
    # A conversion killed half-way: its temporary folder (~0.5 GB for the demo model) is left.
    other = dest_parent / ".other-model-0123.x.tmp"  # another model, maybe converting now: kept
    other.mkdir()
    first = models._converted(gguf, "float32")
    killed = dest_parent / f".{first.name}.k1ll.tmp"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    (first / "config.json").unlink()  # as if that conversion had never finished
    first.rmdir()

    out = []
    threads = [threading.Thread(target=lambda: out.append(models._converted(gguf, "float32"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out[0] == out[1] == first and (first / "config.json").is_file()
    assert len(calls) == 2  # the first call, then ONE of the two concurrent callers
    assert not killed.exists()  # the killed run's temporary is gone
    assert other.exists()  # other models' folders are not touched
    assert not list(dest_parent.glob(f".{first.name}.*.tmp"))
