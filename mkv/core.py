"""Pure decisions: where to write, where to read from, what to answer.

Nothing here does IO or reads a clock; handlers gather the facts (a record, the
health map, upload results), call these functions, and carry out the answer.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from urllib.parse import parse_qsl, quote

from mkv.keys import blob_path
from mkv.model import HealthRow, Record, State
from mkv.ring import Ring, failure_domain


class Health(enum.Enum):
    UP = "up"
    DOWN = "down"
    UNKNOWN = "unknown"  # no fresh status: treated as usable, never as down


HealthMap = Mapping[str, Health]


def health_status(rows: Mapping[str, HealthRow], now: float, stale_after: float) -> dict[str, Health]:
    """Read the published rows; a status older than `stale_after` seconds is UNKNOWN."""
    out: dict[str, Health] = {}
    for vol, row in rows.items():
        if now - row.checked > stale_after:
            out[vol] = Health.UNKNOWN
        else:
            out[vol] = Health.UP if row.up else Health.DOWN
    return out


def usable(volume: str, health: HealthMap) -> bool:
    return health.get(volume, Health.UNKNOWN) is not Health.DOWN


# --- placement -------------------------------------------------------------------------


class NotEnoughVolumes(Exception):
    """Fewer healthy failure domains than replicas: a PUT cannot be made whole."""


def place(key: str, ring: Ring, health: HealthMap, replicas: int) -> list[str]:
    """The R volumes a new value goes to: the ring's, skipping down ones clockwise."""
    chosen = ring.place_avoiding(key, replicas, lambda v: usable(v, health))
    if len(chosen) < replicas:
        raise NotEnoughVolumes(f"{len(chosen)} healthy failure domains, {replicas} needed")
    return chosen


def balanced(record: Record, ring: Ring, replicas: int) -> bool:
    """True when the record's volumes are exactly where the ring wants them."""
    return list(record.volumes) == ring.place(record.key, replicas)


# --- reads -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Redirect:
    location: str
    volume: str | None


@dataclasses.dataclass(frozen=True)
class NotFound:
    pass


@dataclasses.dataclass(frozen=True)
class Unavailable:
    reason: str


ReadTarget = Redirect | NotFound | Unavailable


def read_target(key: str, record: Record | None, health: HealthMap, fallback: str = "",
                spread: int = 0) -> ReadTarget:
    """Where a GET of `key` should go.

    Prefer replicas in ring order, skipping down volumes; when several are up,
    `spread` (any integer, e.g. a per-request counter) rotates among them so one
    volume does not take every read of a hot key.
    """
    if record is None or record.state is not State.LIVE:
        if fallback and record is None:
            return Redirect(f"http://{fallback}{quote(key, safe='/')}", None)
        return NotFound()
    up = [v for v in record.volumes if health.get(v, Health.UNKNOWN) is Health.UP]
    candidates = up or [v for v in record.volumes if usable(v, health)]
    if not candidates:
        return Unavailable("every replica's volume is down")
    volume = candidates[spread % len(candidates)]
    return Redirect(f"http://{volume}{blob_path(key)}", volume)


# --- writes ----------------------------------------------------------------------------


class PutOutcome(enum.Enum):
    STORED = 201
    FAILED = 502


def put_outcome(results: Sequence[BaseException | None]) -> PutOutcome:
    """A PUT is stored only if every replica upload succeeded."""
    return PutOutcome.STORED if results and all(r is None for r in results) else PutOutcome.FAILED


class Verdict(enum.Enum):
    """What a write may do given the key's current record."""

    PROCEED = "proceed"
    EXISTS = "exists"        # 403
    MISSING = "missing"      # 404
    PROTECTED = "protected"  # 403: protect is on and the key was not unlinked first


def put_verdict(record: Record | None) -> Verdict:
    """PUT never overwrites a live key; an unlinked or deleted one may be written again."""
    return Verdict.EXISTS if record is not None and record.state is State.LIVE else Verdict.PROCEED


def delete_verdict(record: Record | None, protect: bool) -> Verdict:
    if record is None or record.state is State.DELETING:
        return Verdict.MISSING
    if protect and record.state is not State.UNLINKED:
        return Verdict.PROTECTED
    return Verdict.PROCEED


def unlink_verdict(record: Record | None) -> Verdict:
    return Verdict.PROCEED if record is not None and record.state is State.LIVE else Verdict.MISSING


def cleanup_volumes(old: Record, new_volumes: Sequence[str]) -> list[str]:
    """Volumes of a pending delete whose copies must not be removed after a re-PUT.

    The blob name depends only on the key, so a pending cleanup may only remove
    copies from volumes the key's current record does not use.
    """
    return [v for v in old.volumes if v not in new_volumes]


# --- rebalance -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Move:
    """What one key needs to be where the ring wants it, with R good copies.

    Order of work: copy to `copy_to` (from a `sources` copy), write sidecars to
    `sidecar_to`, point the index at `desired`, and only then delete `drop`.
    """

    key: str
    desired: tuple[str, ...]
    sources: tuple[str, ...]
    copy_to: tuple[str, ...]
    sidecar_to: tuple[str, ...]
    drop: tuple[str, ...]

    @property
    def lost(self) -> bool:
        """No good copy anywhere: nothing can be repaired, nothing may be touched."""
        return not self.sources

    @property
    def noop(self) -> bool:
        return not (self.copy_to or self.sidecar_to or self.drop)


def rebalance_plan(record: Record, desired: Sequence[str], good: set[str],
                   sidecar_ok: set[str]) -> Move:
    """Plan one key. `good`: recorded volumes whose blob checked out (size, md5 if
    verified); `sidecar_ok`: those whose sidecar exists too."""
    sources = tuple(v for v in record.volumes if v in good)
    if not sources:
        return Move(record.key, tuple(desired), (), (), (), ())
    copy_to = tuple(v for v in desired if v not in good)
    sidecar_to = tuple(v for v in desired if v in good and v not in sidecar_ok)
    drop = tuple(v for v in record.volumes if v not in desired)
    return Move(record.key, tuple(desired), sources, copy_to, sidecar_to, drop)


class RateLimiter:
    """Token bucket over bytes; `delay(n)` says how long to wait before sending n more.

    Pure: the caller passes the clock, so it is tested without sleeping.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1 << 20)
        self.tokens = self.burst
        self.at: float | None = None

    def delay(self, n: int, now: float) -> float:
        if self.rate <= 0:
            return 0.0
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


# --- requests --------------------------------------------------------------------------


class BadQuery(ValueError):
    """A query string mkv does not understand (400)."""


@dataclasses.dataclass(frozen=True)
class ListQuery:
    state: State
    start: str
    limit: int | None


def parse_query(query: str) -> ListQuery | None:
    """None for a plain key request; a ListQuery for ?list / ?unlinked; BadQuery otherwise."""
    if not query:
        return None
    try:
        pairs = parse_qsl(query, keep_blank_values=True, encoding="utf-8", errors="strict")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadQuery(f"malformed query string: {exc}") from exc
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise BadQuery(f"{name} given twice")
        params[name] = value
    modes = [m for m in ("list", "unlinked") if m in params]
    if len(modes) != 1:
        raise BadQuery("expected exactly one of ?list or ?unlinked")
    unknown = set(params) - {"list", "unlinked", "start", "limit"}
    if unknown:
        raise BadQuery(f"unknown query parameter {sorted(unknown)[0]!r}")
    limit = None
    if "limit" in params:
        text = params["limit"]
        if not text.isascii() or not text.isdigit() or int(text) < 1:
            raise BadQuery("limit must be a positive integer")
        limit = int(text)
    state = State.LIVE if modes[0] == "list" else State.UNLINKED
    return ListQuery(state, params.get("start", ""), limit)


def distinct_domains(volumes: Sequence[str]) -> int:
    return len({failure_domain(v) for v in volumes})
