"""SIGTERM (what `kill`, batch schedulers and container runtimes send) is handled like Ctrl-C.

Outside training a signal stops at once, as Ctrl-C does: every artifact is written atomically and a
stage's done-marker last, so a stop anywhere leaves finished stages and nothing half-written. Inside
the training loop (``defer(True)``) the stop waits for the current optimizer step to end, so the
loop can save a resumable checkpoint first; a second signal stops at once.

Under a multi-process launcher (torchrun passes its SIGTERM on to every rank, then SIGKILLs them
after 30 s) the ranks agree at the end of each step whether any of them was signalled, so all of
them save the same checkpoint and stop after the same step; outside training each stops at once.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_defer = False
_pending: int | None = None


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; `signum` is SIGINT or SIGTERM (exit status 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _handler(signum, frame) -> None:
    global _pending
    if _defer and _pending is None:
        _pending = signum
        return
    raise Interrupted(signum)


def install() -> dict:
    """Handle SIGINT and SIGTERM; returns the previous handlers for `restore`. Python lets only the
    main thread set handlers; called from another thread this leaves the defaults."""
    previous = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for s in (signal.SIGINT, signal.SIGTERM):
        previous[s] = signal.signal(s, _handler)
    return previous


def restore(previous: dict) -> None:
    defer(False)
    for s, h in previous.items():
        signal.signal(s, h)


def defer(enabled: bool) -> None:
    """From now on (while `enabled`), a signal is only noted (see `pending`), to be acted on at the
    next safe point; defer(False) ends that and forgets a noted signal."""
    global _defer, _pending
    _defer, _pending = enabled, None


@contextmanager
def deferred():
    """defer(True) for the block, and defer(False) after it however it ends (a step that raised
    must not leave a later Ctrl-C only noted)."""
    defer(True)
    try:
        yield
    finally:
        defer(False)


def pending() -> int | None:
    """The signal noted inside `deferred()`, or None."""
    return _pending
