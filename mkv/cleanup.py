"""Finishing a pending delete: the one function the service's DELETE, the health
process and mkv-rebalance call to remove a DELETING record's copies and record what is
left (docs/design.md, "Delete protocol").

The caller holds the key's lock. Whether that lock must be checked before copies are
removed has one answer: always. A writer restart drops every lock, and a client may
have written or deleted the key since: the record read before would then be stale.
So the lock is confirmed on the connection that took it (one round trip), right
before the removal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mkv import core
from mkv.model import Record, State
from mkv.volumes.errors import VolumeError
from mkv.volumes.pool import Pool
from mkv.writer.client import WriterClient


def finish_delete(pool: Pool, writer: WriterClient, record: Record,
                  remove_on: Sequence[str]) -> tuple[tuple[str, ...], list[VolumeError]]:
    """Remove `record`'s copies on `remove_on` (the volumes believed reachable), then
    delete the record, or keep it DELETING naming the copies left. Returns the copies
    left and the volume errors met. Raises LockLost (nothing removed) if the lock is
    gone, and a WriterError if the writer refuses the outcome (a conflict: a newer write)."""
    assert record.state is State.DELETING
    writer.held(record.key)
    errors = list(pool.remove_copies(record.key, remove_on, record.gen).values())
    not_tried = [v for v in record.volumes if v not in remove_on]
    left = core.copies_left(record, not_tried, [e.volume for e in errors])
    if left:
        if left != record.volumes:
            writer.put(dataclasses.replace(record, volumes=left), expect=record, retry=True)
        else:
            writer.release(record.key)
    else:
        writer.delete(record.key, expect=record, retry=True)
    return left, errors
