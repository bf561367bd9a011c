"""mkv-scrub: read every blob, check its size and md5 against the index, and mend a bad
copy from a good one (docs/design.md, "Self-healing").

Each key is checked and mended under its lock by mkv-rebalance's per-key procedure
(mkv.repair.mender), its copies kept where they are. A key with no good copy is
reported and left alone: the last copy, even a bad one, is never deleted. Reads and
copies together stay within --limit-rate bytes per second (default: the config's
repair-rate). The service's writer is used while it runs; otherwise one is started
here, which keeps a service from starting on this index until the scrub is over.

Exit 0: every copy was good; 1: problems were found (each printed: mended, lost, or
failed); 2: usage. Ctrl-C stops after the keys in hand (exit 130).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import Counter

import configargparse

from mkv import config as config_mod
from mkv.index import schema
from mkv.index.reader import Reader
from mkv.repair.mender import Mender, Outcome, Result
from mkv.repair.walk import scrub
from mkv.tools.rebalance import KeyProblem
from mkv.writer.lockfile import writer_running
from mkv.writer.server import serve_in_thread


class ReportOnly(Mender):
    """--no-repair: check and report; a bad copy is neither copied nor touched."""

    def _copy(self, rec, sources, targets) -> None:  # noqa: ANN001 - Mender's
        raise KeyProblem(f"bad copy on {', '.join(targets)} (not repaired: --no-repair)")


def add_arguments(p: configargparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=int, default=2, help="keys checked at once")
    p.add_argument("--limit-rate", type=float, default=None,
                   help="bytes per second read and copied (default: repair-rate; 0: unlimited)")
    p.add_argument("--no-repair", action="store_true",
                   help="only report bad copies, change nothing")
    p.add_argument("--quiet", action="store_true", help="no line per mended key")


def main(argv: list[str] | None = None) -> int:
    cfg, ns = config_mod.load(argv, prog="mkv-scrub",
                              description="Check every blob against the index and mend bad copies.",
                              extend=add_arguments)
    rate = cfg.repair_rate if ns.limit_rate is None else ns.limit_rate
    if ns.concurrency < 1 or rate < 0:
        print("mkv-scrub: --concurrency must be >= 1 and --limit-rate >= 0", file=sys.stderr)
        return 2
    try:
        reader = Reader(schema.connect(cfg.db))
        total = reader.count()
    except Exception as exc:  # noqa: BLE001 - any reason the index cannot be read
        print(f"mkv-scrub: cannot read the index {cfg.db}: {exc}", file=sys.stderr)
        return 2
    own_writer = None if writer_running(cfg.db) else serve_in_thread(cfg.db, cfg.writer_socket)
    counts: Counter = Counter()
    lock = threading.Lock()

    def note(result: Result) -> None:
        with lock:
            counts[result.outcome] += 1
        if result.outcome is not Outcome.CLEAN and not ns.quiet:
            print(f"mkv-scrub: {result.key!r}: {result.outcome.value}: {result.detail}",
                  file=sys.stderr, flush=True)

    kind = ReportOnly if ns.no_repair else Mender
    mender = kind(cfg, concurrency=ns.concurrency, limit_rate=rate, verify=True, quiet=True)
    got: dict[str, int] = {}

    def handle(signum: int, frame: object) -> None:
        got["signal"] = signum
        mender.interrupt()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)
    started = time.monotonic()
    try:
        scrub(mender, reader, ns.concurrency, note)
    finally:
        if own_writer is not None:
            server, thread = own_writer
            server.stop()
            thread.join(10)
    problems = sum(n for o, n in counts.items() if o is not Outcome.CLEAN)
    print(f"mkv-scrub: {'interrupted' if got else 'done'}: {sum(counts.values())}/{total} keys "
          f"checked, {counts[Outcome.CLEAN]} clean, {counts[Outcome.REPAIRED]} repaired, "
          f"{counts[Outcome.LOST]} with no good copy (left alone), {counts[Outcome.FAILED]} "
          f"failed, {mender.stats.bytes / 1e6:.1f} MB copied, {time.monotonic() - started:.1f}s",
          file=sys.stderr)
    if got:
        return 128 + got["signal"]
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
