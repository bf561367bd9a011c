"""Mending one key's copies in place, with mkv-rebalance's per-key procedure.

`Mender` is a Rebalancer whose wanted volumes are the record's own: a key is never
moved, a copy that is missing, short, or (verifying) of the wrong md5 is streamed again
from a good one under the key's lock, and the index is changed only by compare-and-set.
A key with no good copy is reported and left alone (core.rebalance_plan: lost).
docs/design.md, "Self-healing".
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib

from mkv.keys import blob_path
from mkv.model import Record
from mkv.tools.rebalance import CHUNK, Rebalancer
from mkv.tools.throttle import RateLimiter
from mkv.volumes.errors import VolumeError


class Outcome(enum.Enum):
    CLEAN = "clean"        # every copy was good: nothing done
    REPAIRED = "repaired"  # copies were made again
    LOST = "lost"          # no good copy anywhere: left alone
    FAILED = "failed"      # could not be done now (a volume failed, ...): try again
    BUSY = "busy"          # a client write holds the key: try again
    STOPPED = "stopped"    # the process is stopping: not started


@dataclasses.dataclass(frozen=True)
class Result:
    key: str
    outcome: Outcome
    detail: str = ""
    #: bytes copied for it
    copied: int = 0


LOST_PROBLEM = "no good copy on any recorded volume"


class Mender(Rebalancer):
    def desired(self, rec: Record) -> tuple[str, ...]:
        return tuple(rec.volumes)

    def _md5_of(self, vol: str, rec: Record) -> str | None:
        """Reading to verify counts against the rate like copying (the scrub's reads)."""
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with self.pool.download(vol, blob_path(rec.key, rec.gen)) as blob:
                for chunk in blob.chunks(CHUNK):
                    self._throttle(len(chunk))
                    digest.update(chunk)
        except VolumeError:
            return None
        return digest.hexdigest()

    def mend(self, key: str) -> Result:
        """One key: its outcome, from what the rebalance procedure did and reported."""
        done = self.process(key)
        with self._stats_lock:
            made = self._made.pop(key, None)
            problem = self.stats.problems.pop(key, None)
        if done is None:
            return Result(key, Outcome.STOPPED)
        if done is False:
            return Result(key, Outcome.BUSY)
        if problem is not None:
            return Result(key, Outcome.LOST if problem == LOST_PROBLEM else Outcome.FAILED, problem)
        if made is not None:
            copied, targets = made
            return Result(key, Outcome.REPAIRED, "copied again to " + ", ".join(targets), copied)
        return Result(key, Outcome.CLEAN)

    def _copy(self, rec: Record, sources: tuple[str, ...], targets: tuple[str, ...]) -> None:
        super()._copy(rec, sources, targets)
        with self._stats_lock:  # keys are mended at once: noted per key
            copied, before = self._made.get(rec.key, (0, ()))
            self._made[rec.key] = (copied + rec.size * len(targets), before + targets)

    def __init__(self, *args, **kw) -> None:  # noqa: ANN002, ANN003 - Rebalancer's
        super().__init__(*args, **kw)
        # a background job: a tenth of a second's worth at once, not the tool's whole
        # second (or MiB), so the rate holds from the start even when it is low
        rate = self.limiter.rate
        self.limiter = RateLimiter(rate, burst=rate / 10)
        #: per key being mended: (bytes copied, the volumes copied to)
        self._made: dict[str, tuple[int, tuple[str, ...]]] = {}
