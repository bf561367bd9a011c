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
    """One key's row: where its bytes really are, in ring order."""

    key: str
    state: State
    volumes: tuple[str, ...]
    size: int
    md5: str
    mtime: float


@dataclasses.dataclass(frozen=True, slots=True)
class HealthRow:
    """A volume's status as the health process last published it."""

    volume: str
    up: bool
    checked: float
    since: float
    latency_ms: float | None
    error: str | None
