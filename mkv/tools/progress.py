"""One status line for the tools (mkv-rebuild, mkv-rebalance) on stderr: rewritten in
place on a terminal, a new line every FILE_INTERVAL seconds when the output is a file or
a pipe (a log is read later, and a line every quarter second would bury the summary)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

#: Seconds between rewrites of the line on a terminal.
TTY_INTERVAL = 0.25
#: Seconds between lines in a file or a pipe.
FILE_INTERVAL = 10.0


class Progress:
    def __init__(self, out: TextIO, enabled: bool = True, file_interval: float = FILE_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.enabled = enabled
        self.tty = enabled and hasattr(out, "isatty") and out.isatty()
        self.interval = TTY_INTERVAL if self.tty else file_interval
        self.clock = clock
        self.last = clock()  # a run shorter than one interval shows no progress
        self.shown = False

    def show(self, line: str, force: bool = False) -> None:
        """Show `line` if an interval has passed since the last (or if `force`)."""
        now = self.clock()
        if not self.enabled or (not force and now - self.last < self.interval):
            return
        self.last = now
        if self.tty:
            self.out.write("\r" + line + "\x1b[K")
            self.shown = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def end(self) -> None:
        """Finish a line rewritten in place, so what follows starts on its own line."""
        if self.shown:
            self.out.write("\n")
            self.out.flush()
            self.shown = False


def human_size(n: float) -> str:
    """Bytes in the largest binary unit below 1024 of it, for the tools' summaries."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""
