"""Progress of the report phase (implicit rewards, exploration scoring, plots): each step is
announced with its count, as a tqdm bar on a terminal and as one plain line per step otherwise
(a log file or CI keeps every line; a bar would leave carriage-return residue)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Steps:
    """`total` steps named `desc`; call `start(label)` as each step begins, `close()` at the end."""

    def __init__(self, desc: str, total: int, stream=None):
        self.desc, self.total, self.done = desc, total, 0
        self.stream = stream or sys.stderr
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=total, desc=desc, unit="step", file=self.stream) if tty and total else None

    def start(self, label: str) -> None:
        if self.bar is not None:
            if self.done:
                self.bar.update(1)
            self.bar.set_postfix_str(label)
        else:
            print(f"{self.desc}: {self.done + 1}/{self.total} {label}", file=self.stream, flush=True)
        self.done += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.total - self.bar.n)
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
