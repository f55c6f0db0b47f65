"""What a user sees on stderr once progress bars are set aside: the lines the CLI itself printed."""

import re

_BAR = re.compile(r"\d+%\|.*\| *[\d.?]+[kM]?/[\d.?]+[kM]?")


def message_lines(err: str) -> list[str]:
    """stderr lines that are not progress-bar frames (a terminal shows the text after the last \\r)."""
    lines = [line.split("\r")[-1] for line in err.splitlines()]
    return [line for line in lines if line.strip() and not _BAR.search(line)]
