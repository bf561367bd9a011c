"""The token bucket on ?list and ?unlinked, one for all the workers of a service.

A listing is a range scan of the index; a client paging through millions of keys as fast
as it can keeps worker threads and the disk busy while GETs and PUTs wait. So listings
are limited per service (`list-rate` per second, `list-burst` at once), and nothing else
is: key reads and writes never meet this bucket (docs/design.md, "Processes").

The bucket is 16 bytes of shared memory (tokens, and when it was last filled), made by
the master as a memfd that every worker inherits across the fork, like the index's
change count (mkv.index.cache). A worker takes a token under an fcntl record lock: record
locks belong to a process, so they exclude the other workers even on the inherited
descriptor, and the kernel lets go of one whose worker dies holding it. Threads of one
worker take turns on a plain lock first (record locks do not exclude threads).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time

_STATE = struct.Struct("=dd")  # tokens, monotonic time of the last fill (0: never filled)


def take(tokens: float, filled_at: float, now: float, rate: float, burst: float
         ) -> tuple[float, float, float]:
    """One request against the bucket: (tokens left, filled at, seconds to wait).

    A wait of 0 means the request is let through and has used a token; otherwise the
    bucket is unchanged apart from its refill, and the wait is when a token will be there.
    A bucket never filled starts full.
    """
    if filled_at <= 0:
        tokens = burst
    else:
        tokens = min(burst, tokens + max(0.0, now - filled_at) * rate)
    if tokens >= 1:
        return tokens - 1, now, 0.0
    return tokens, now, (1 - tokens) / rate


class ListLimiter:
    """The shared bucket. `fd` is the master's memfd; without one the bucket is this
    process's own (the app outside `mkv serve`, in tests)."""

    def __init__(self, rate: float, burst: int, fd: int | None = None) -> None:
        self.rate = rate
        self.burst = float(burst)
        if fd is None:
            fd = create()
        self.fd = fd
        self._map = mmap.mmap(fd, _STATE.size)
        self._lock = threading.Lock()

    def wait(self) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there is."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
            try:
                tokens, filled_at = _STATE.unpack_from(self._map)
                tokens, filled_at, wait = take(tokens, filled_at, time.monotonic(),
                                               self.rate, self.burst)
                _STATE.pack_into(self._map, 0, tokens, filled_at)
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
        return wait


def create() -> int:
    """A new, never filled bucket's memory; the descriptor is inherited by forked workers."""
    fd = os.memfd_create("mkv-list-bucket")
    os.ftruncate(fd, _STATE.size)
    return fd
