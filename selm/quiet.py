"""A quiet screen: third-party messages that tell a selm user nothing are filtered where they are
raised, and progress bars become plain lines when stderr is not a terminal (a log file, a pipe)."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Callable

# accelerate imports DeepSpeed (when installed) to check whether a model it unwraps is a DeepSpeed
# engine; that import alone makes DeepSpeed probe for an accelerator and warn, on every CPU-only
# training stage, that it "set the accelerator to CPU" -- though no DeepSpeed engine is in use.
_DEEPSPEED_CPU = "Setting accelerator to CPU"

_CURSOR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def filter_known_warnings() -> None:
    """Drop DeepSpeed's accelerator warning (its logger keeps filters added before its import)."""
    logging.getLogger("DeepSpeed").addFilter(lambda record: _DEEPSPEED_CPU not in record.getMessage())


class PlainLines:
    """A text stream that turns progress-bar redraws ("\\r" and cursor codes) into whole lines."""

    def __init__(self, stream):
        self.stream = stream
        self._line = ""

    def write(self, text: str) -> int:
        text = _CURSOR.sub("", text).replace("\r", "\n")
        for part in re.split(r"(\n)", text):
            if part == "\n":
                if self._line.strip():
                    self.stream.write(self._line.rstrip() + "\n")
                self._line = ""
            else:
                self._line += part
        return len(text)

    def flush(self) -> None:
        # A bar flushes after every redraw; its line is written when the next redraw ends it.
        self.stream.flush()

    def close_line(self) -> None:
        if self._line.strip():
            self.stream.write(self._line.rstrip() + "\n")
        self._line = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.stream, name)


def quiet_screen() -> Callable[[], None]:
    """Set up the quiet screen for one command; returns the function that undoes it."""
    filter_known_warnings()
    if sys.stderr.isatty():
        return lambda: None
    # Bars drawn on one line each (nested bars move the cursor between lines) and redrawn seldom.
    os.environ.setdefault("TQDM_POSITION", "0")
    os.environ.setdefault("TQDM_MININTERVAL", "10")
    previous = sys.stderr
    sys.stderr = PlainLines(previous)

    def restore() -> None:
        if isinstance(sys.stderr, PlainLines):
            sys.stderr.close_line()
        sys.stderr = previous

    return restore
