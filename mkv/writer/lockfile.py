"""Whether a writer is running on an index: an exclusive flock on `<db>.writer.lock`.

The writer holds the lock for its whole life; the kernel drops it when the process
exits, however it exits, so there is no stale state to clean up and no socket to probe.
The tools ask the same question the same way: mkv-rebuild refuses to replace an index a
writer is using, mkv-rebalance runs its own writer only when none is running.
"""

from __future__ import annotations

import fcntl
import os

from mkv.writer.protocol import WriterError


class WriterBusy(WriterError):
    """Another writer holds the index's lock."""

    def __init__(self, detail: str) -> None:
        super().__init__("busy", detail)


def lock_path(db: str) -> str:
    return db + ".writer.lock"


class WriterLock:
    """The lock a writer takes on start and keeps until `release` or its exit."""

    def __init__(self, db: str) -> None:
        self.path = lock_path(db)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WriterBusy(f"another writer is running on {db} (it holds {self.path})") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = -1


def writer_running(db: str) -> bool:
    """True while some process holds `db`'s writer lock."""
    try:
        fd = os.open(lock_path(db), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
