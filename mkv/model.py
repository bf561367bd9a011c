"""Plain data every part of mkv passes around: a key's record, its state, a volume's
published health. No IO, so the pure core (mkv.core) and the tools use them without
touching SQLite. docs/design.md, "Index", says what each state means.
"""

from __future__ import annotations

import dataclasses
import enum


class State(enum.IntEnum):
    """Life of a record. Only LIVE is visible to GET, HEAD and ?list."""

    LIVE = 1
    UNLINKED = 2  # soft-deleted: blobs kept, listed by ?unlinked
    DELETING = 3  # hard delete recorded; blob removal on some volumes still pending


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One key's row: where its bytes really are, in ring order, and the generation of
    the write that made them (part of the file names; "" for data written before
    generations, whose files carry none)."""

    key: str
    state: State
    volumes: tuple[str, ...]
    size: int
    md5: str
    mtime: float
    gen: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class HealthRow:
    """A volume's status as the health process last published it."""

    volume: str
    up: bool
    checked: float
    since: float
    latency_ms: float | None
    error: str | None
    #: its disk is not the one the index knows (docs/design.md, "Self-healing")
    replaced: bool = False


class PendingOp(enum.IntEnum):
    """Work on one copy that must happen even if nobody asks again (docs/design.md,
    "Pending operations")."""

    REMOVE = 1         # the copy is not named by the key's record: remove it
    MARK_UNLINKED = 2  # the key was unlinked while this copy's volume was down: mark its sidecar


class PendingState(enum.IntEnum):
    INTENT = 0    # a write may be putting a copy there right now: leave it alone
    DUE = 1       # to be done as soon as the volume answers
    ORPHANED = 2  # an intent whose writer process restarted: due once the write had its time


@dataclasses.dataclass(frozen=True, slots=True)
class Pending:
    """One pending operation: on the copy of write `gen` of `key` on `volume`."""

    key: str
    volume: str
    op: PendingOp
    state: PendingState
    since: float
    gen: str = ""
