"""The repair process, a child of `mkv serve` beside the writer and the health process
(docs/design.md, "Self-healing").

It takes keys from the repair queue in the index (filled by the health process when a
volume's disk is replaced, and by anyone who finds a copy missing) and mends them with
mkv-rebalance's per-key procedure (mkv.repair.mender), at most `repair-rate` bytes per
second. A queue row goes only once its key is whole, so a restart, a failed volume or a
kill resumes where it was; a key that fails is tried again later, less often each time.
With `scrub-interval` it also scrubs every blob on that schedule, in a thread of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from mkv.config import Config
from mkv.index import schema
from mkv.index.reader import Reader
from mkv.repair import metrics
from mkv.repair.mender import Mender, Outcome, Result
from mkv.repair.walk import scrub
from mkv.writer.protocol import WriterError

log = logging.getLogger("mkv.repair")

BATCH = 100
CONCURRENCY = 4
#: seconds before a failed key is tried again: doubled per attempt, up to the cap
RETRY_FIRST, RETRY_CAP = 2.0, 300.0
#: seconds before a key a client write held is tried again
BUSY_AGAIN = 1.0


def retry_after(attempts: int) -> float:
    return min(RETRY_CAP, RETRY_FIRST * 2 ** max(attempts, 0))


class RepairProcess:
    def __init__(self, cfg: Config, *, idle: float = 0.5) -> None:
        self.cfg = cfg
        self.idle = idle
        self.reader = Reader(schema.connect(cfg.db, synchronous=cfg.synchronous))
        # one mender for the queue and one for the scrub: each its own rate and stop flag,
        # both at repair-rate (the scrub reads too, the queue only copies)
        self.mender = Mender(cfg, concurrency=CONCURRENCY, limit_rate=cfg.repair_rate,
                             verify=False, quiet=True)
        self.scrubber = Mender(cfg, concurrency=2, limit_rate=cfg.repair_rate, verify=True,
                               quiet=True)
        self.keys_pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="repair")
        self.attempts: dict[str, int] = {}
        self.stopping = threading.Event()
        metrics.zero()

    def stop(self) -> None:
        self.stopping.set()
        self.mender.interrupt()
        self.scrubber.interrupt()

    def settle(self, result: Result) -> None:
        """Record a queued key's outcome in the index (the row goes once it is whole)."""
        writer = self.mender.writer
        if result.outcome in (Outcome.REPAIRED, Outcome.CLEAN):
            writer.repair_done(result.key)
            self.attempts.pop(result.key, None)
            metrics.REPAIRS.labels(result.outcome.value).inc()
            metrics.REPAIR_BYTES.inc(result.copied)
            if result.outcome is Outcome.REPAIRED:
                log.info("repaired %r: %s", result.key, result.detail)
        elif result.outcome is Outcome.BUSY:  # a client write holds it: again in a moment
            writer.repair_failed(result.key, "in use by a client write", BUSY_AGAIN)
        elif result.outcome in (Outcome.FAILED, Outcome.LOST):
            n = self.attempts.get(result.key, 0)
            self.attempts[result.key] = n + 1
            writer.repair_failed(result.key, result.detail, retry_after(n))
            metrics.REPAIRS.labels("failed").inc()
            log.warning("repair of %r failed (attempt %d): %s", result.key, n + 1, result.detail)

    def drain(self) -> int:
        """Mend the keys due now; how many were taken."""
        keys = self.reader.repair_due(time.time(), BATCH)
        for result in self.keys_pool.map(self.mender.mend, keys):
            self.settle(result)
        return len(keys)

    def run(self) -> None:
        if self.cfg.scrub_interval > 0:
            threading.Thread(target=self._scrub_schedule, name="scrub", daemon=True).start()
        while not self.stopping.is_set():
            try:
                taken = self.drain()
            except WriterError as exc:
                log.warning("repair: the writer did not answer: %s", exc)
                taken = 0
            except Exception:  # noqa: BLE001 - the queue stays; the next turn tries again
                log.exception("repair round failed")
                taken = 0
            if not taken:
                self.stopping.wait(self.idle)

    def _scrub_schedule(self) -> None:
        while not self.stopping.wait(self.cfg.scrub_interval):
            self.scrub_once()

    def scrub_once(self) -> Counter:
        """One background pass over every blob (mkv.repair.walk); its outcomes."""
        started = time.monotonic()
        counts: Counter = Counter()
        try:
            scrub(self.scrubber, self.reader, 2, lambda r: self._scrubbed(r, counts))
        except Exception:  # noqa: BLE001 - the next pass tries again
            log.exception("scrub failed")
        log.info("scrub done in %.0fs: %s", time.monotonic() - started,
                 ", ".join(f"{n} {o.value}" for o, n in counts.items()) or "no keys")
        return counts

    @staticmethod
    def _scrubbed(result: Result, counts: Counter) -> None:
        counts[result.outcome] += 1
        metrics.REPAIR_BYTES.inc(result.copied)
        metrics.SCRUBBED.labels(result.outcome.value).inc()
        if result.outcome is not Outcome.CLEAN:
            log.warning("scrub: %r %s: %s", result.key, result.outcome.value, result.detail)
