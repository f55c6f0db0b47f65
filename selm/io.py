"""Atomic file writing, JSONL reading with line-numbered errors, and the stage protocol.

Every artifact goes to a temporary name in the same folder and is renamed into place, so a crash
leaves either the old file or the new one, never half of one. A stage's done-marker is written last
(see ``ensure_stage``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

DONE_MARKER = "DONE.json"
FAILED_MARKER = "FAILED.json"
"""Written by ensure_stage when a stage's build raises (the error, one line); removed when it starts
again. `selm status` shows it."""


class InputError(ValueError):
    """Bad user input: the message names the file, line or field. The CLI prints it on one line."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write names the file it was for (a full disk says no more)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def decode_utf8(data: bytes, where: str) -> str:
    """Text of `data`, or an InputError naming `where` ("file:line") and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {e.start + 1}); "
                         "save the file as UTF-8") from None


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file; a byte that is not UTF-8 raises InputError naming the file and line."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        line_start = data.rfind(b"\n", 0, e.start) + 1
        decode_utf8(data[line_start:e.end], f"{path}:{lineno}")
        raise  # not reached: the line itself fails to decode


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-blank line; a bad line raises InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    with path.open("rb") as f:  # decoded line by line, so a bad byte is reported with its line
        for lineno, raw in enumerate(f, 1):
            line = decode_utf8(raw, f"{path}:{lineno}")
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path)]


class AtomicDir:
    """Build a folder under a temporary name and rename it into place on success.

    >>> with AtomicDir(out) as tmp:  # write files into tmp
    ...     model.save_pretrained(tmp)
    An existing ``out`` is replaced only once the new folder is complete.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)


def clean_stale_temporaries(folder: str | os.PathLike) -> None:
    """Remove temp files/folders left by a killed process (names start with '.' and end '.tmp')."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def is_done(stage_dir: str | os.PathLike) -> bool:
    """Whether the stage is done, as this process sees the folder (one process: `selm status`)."""
    return (Path(stage_dir) / DONE_MARKER).is_file()


def on_main(read: Callable[[], Any]) -> Any:
    """`read()` of the state on disk, done by the main rank and broadcast; every rank calls it together.
    On a shared file system with attribute caching (NFS) another node can still see the state before
    the main rank's last write, and would then take another branch than the main rank."""
    from selm import dist

    return dist.broadcast(read() if dist.is_main() else None)


@contextmanager
def atomic_dir_everywhere(path: str | os.PathLike):
    """AtomicDir for a folder that every process writes into (sharded checkpoints): the main process
    makes the temporary folder and sends its name, all processes write into it, and once all are done
    the main process renames it into place. Every process enters it together."""
    from selm import dist

    folder = AtomicDir(path) if dist.is_main() else None
    tmp = Path(dist.broadcast(str(folder.__enter__()) if folder else None))
    try:
        yield tmp
    except BaseException as e:
        if folder:
            folder.__exit__(type(e), e, e.__traceback__)
        raise
    dist.barrier()
    if folder:
        folder.__exit__(None, None, None)
    dist.barrier()


def is_done_everywhere(stage_dir: str | os.PathLike) -> bool:
    """is_done as the main rank sees it, on every rank (called by all ranks together)."""
    return on_main(lambda: is_done(stage_dir))


def mark_done(stage_dir: str | os.PathLike, info: dict | None = None) -> None:
    """Write the stage's done-marker. Call this LAST, after every artifact is in place."""
    atomic_write_json(Path(stage_dir) / DONE_MARKER, info or {})


def ensure_stage(stage_dir: str | os.PathLike, build: Callable[[Path], object], *, resume: bool = False) -> dict:
    """Make sure a stage is done, by the protocol every stage folder follows; returns its done-marker.

    Temporaries a killed process left are removed first. A finished stage (its marker is there) is
    not run again. Otherwise what an unfinished run left is wiped and ``build(stage_dir)`` redoes the
    stage from its start -- unless ``resume``: training continues from its own checkpoint. ``build``
    writes the artifacts and then the marker LAST (``mark_done``); if it fails after that (a check of
    its output), the marker is removed again, because a failed stage is not done.
    """
    from selm import dist

    path = Path(stage_dir)
    if dist.is_main():
        clean_stale_temporaries(path)
    if not is_done_everywhere(path):
        # Under several processes every rank builds (they split the work) but only the main rank
        # touches the folder's bookkeeping; the others wait for it on both sides.
        if dist.is_main() and not resume and path.exists():
            shutil.rmtree(path)
        if dist.is_main():
            (path / FAILED_MARKER).unlink(missing_ok=True)
        dist.barrier()
        try:
            build(path)
        except BaseException as e:
            if dist.is_main():
                (path / DONE_MARKER).unlink(missing_ok=True)
                if isinstance(e, Exception):  # not an interrupt: that is no failure of the stage
                    atomic_write_json(path / FAILED_MARKER, {"error": f"{type(e).__name__}: {e}"[:1000]})
            raise
        dist.barrier()
    return on_main(lambda: read_json(path / DONE_MARKER))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@contextmanager
def exclusive_lock(lock: str | os.PathLike):
    """An exclusive advisory lock (POSIX flock) on the file `lock`, across processes (a conversion
    into the shared model cache, a study's analysis made once); yields whether it is held (without
    fcntl, on Windows, nothing is locked)."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
