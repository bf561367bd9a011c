"""One status line for the tools (mkv-rebuild, mkv-rebalance) on stderr: rewritten in
place on a terminal, a new line every few seconds when the output is a file or a pipe."""

from __future__ import annotations

import time
from typing import TextIO


class Progress:
    def __init__(self, out: TextIO, enabled: bool = True, file_interval: float = 2.0) -> None:
        self.out = out
        self.enabled = enabled
        self.tty = enabled and hasattr(out, "isatty") and out.isatty()
        self.interval = 0.25 if self.tty else file_interval
        self.last = time.monotonic()  # a run shorter than one interval shows no progress
        self.shown = False

    def show(self, line: str, force: bool = False) -> None:
        """Show `line` if an interval has passed since the last (or if `force`)."""
        now = time.monotonic()
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
