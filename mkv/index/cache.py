"""Whether a record a worker read earlier may still be served: the index's change count.

A GET is one primary-key read, yet it costs more than the read: apsw lets go of the GIL
around every SQLite call, and with a worker's threads all answering GETs at once those
hand-offs cost more than the lookup itself. So each worker keeps the records it read,
and serves one again only while nothing at all has been committed since.

"Nothing committed since" is one 8-byte counter in shared memory (a memfd, made by the
`mkv serve` master, inherited by the workers and passed to the writer process). The
writer adds one after every transaction and on start, always before it answers the
clients whose writes it committed: once a client is told its PUT, DELETE or UNLINK is
done, no worker can answer from a record read before it. A worker reads the counter
before it reads the index, so a record is tagged with a count no newer than what it saw.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable

from mkv.model import Record

_COUNT = struct.Struct("=Q")

#: Records kept per worker; a full cache is emptied at once (about 300 bytes a record).
CACHE_RECORDS = 16384


class ChangeCount:
    """The shared counter. One process writes it (the writer); any number read it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, _COUNT.size)

    @classmethod
    def create(cls) -> ChangeCount:
        fd = os.memfd_create("mkv-index-changes")
        os.ftruncate(fd, _COUNT.size)
        return cls(fd)

    def read(self) -> int:
        return _COUNT.unpack_from(self._map)[0]

    def bump(self) -> None:
        _COUNT.pack_into(self._map, 0, self.read() + 1)


class RecordCache:
    """Records (and misses) read from the index, each tagged with the change count seen
    before it was read, served again only while the count is unchanged. Safe across a
    gthread worker's threads: a record loaded while the count moves keeps its old tag."""

    def __init__(self, count: ChangeCount, size: int = CACHE_RECORDS) -> None:
        self.count = count
        self.size = size
        self._entries: dict[str, tuple[int, Record | None]] = {}

    def get(self, key: str, load: Callable[[str], Record | None]) -> Record | None:
        seen = self.count.read()
        hit = self._entries.get(key)
        if hit is not None and hit[0] == seen:
            return hit[1]
        record = load(key)
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[key] = (seen, record)
        return record
