"""Pure decisions: where to write, where to read from, what to answer.

Nothing here does IO or reads a clock; handlers gather the facts (a record, the
health map, upload results), call these functions, and carry out the answer.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from urllib.parse import quote

from mkv import signing
from mkv.keys import blob_path
from mkv.model import HealthRow, Pending, PendingOp, PendingState, Record, State
from mkv.ring import Ring, failure_domain
from mkv.volumes.errors import ShortWrite, VolumeError, VolumeStatus


class Health(enum.Enum):
    UP = "up"
    DOWN = "down"
    UNKNOWN = "unknown"  # no fresh status: treated as usable, never as down
    #: answers, but its disk is not the one the index knows: writes may go there, reads
    #: never (docs/design.md, "Self-healing")
    REPLACED = "replaced"


HealthMap = Mapping[str, Health]


def health_status(rows: Mapping[str, HealthRow], now: float, stale_after: float) -> dict[str, Health]:
    """Read the published rows; a status older than `stale_after` seconds is UNKNOWN."""
    out: dict[str, Health] = {}
    for vol, row in rows.items():
        if now - row.checked > stale_after:
            out[vol] = Health.UNKNOWN
        else:
            out[vol] = (Health.DOWN if not row.up else Health.REPLACED if row.replaced
                        else Health.UP)
    return out


def stale_after(interval: float, timeout: float) -> float:
    """How old a published status may be before it says nothing (UNKNOWN): a few probe
    rounds, so one slow round never turns a volume's status into a guess."""
    return max(3 * interval, 3 * timeout) + 1.0


def usable(volume: str, health: HealthMap) -> bool:
    """May a write go there (a replaced volume takes writes: docs/design.md, "Self-healing")."""
    return health.get(volume, Health.UNKNOWN) is not Health.DOWN


def readable(volume: str, health: HealthMap) -> bool:
    """May a read be sent there: not down, and not a replaced disk that lacks the blobs."""
    return health.get(volume, Health.UNKNOWN) not in (Health.DOWN, Health.REPLACED)


# --- placement -------------------------------------------------------------------------


class NotEnoughVolumes(Exception):
    """Fewer healthy failure domains than replicas: a PUT cannot be made whole."""


def place(key: str, ring: Ring, health: HealthMap, replicas: int) -> list[str]:
    """The R volumes a new value goes to: the ring's rule (distinct zones, hosts, nginx)
    over the volumes that are not down, so a down one passes its turn clockwise."""
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
    #: the URI on the volume (prefix and blob path), which a signed redirect signs
    path: str = ""
    #: the other replicas the volume fails over to, in order (docs/design.md, "Read failover")
    hops: tuple[signing.Hop, ...] = ()


@dataclasses.dataclass(frozen=True)
class NotFound:
    pass


@dataclasses.dataclass(frozen=True)
class Unavailable:
    reason: str


ReadTarget = Redirect | NotFound | Unavailable


def volume_url(volume: str, public: Mapping[str, str]) -> tuple[str, str]:
    """(base URL, path prefix) of a volume as clients reach it: its public URL if one is
    configured (scheme://host[:port], for the volume's host:port), else http://host:port."""
    hostport, _, prefix = volume.partition("/")
    return public.get(volume) or f"http://{hostport}", "/" + prefix if prefix else ""


def failover_hops(base: str, others: Sequence[str], blob: str, public: Mapping[str, str]
                  ) -> tuple[signing.Hop, ...]:
    """The hops after a redirect to `base`: each other replica as host[:port][/prefix] and
    its blob's URI. The volume sends the client on scheme-relative ("//hop/..."), so a
    replica clients reach with another scheme than `base`'s is left out."""
    scheme = base.partition("://")[0]
    hops = []
    for volume in others:
        other, prefix = volume_url(volume, public)
        other_scheme, _, netloc = other.partition("://")
        if other_scheme == scheme:
            hops.append((netloc + prefix, prefix + blob))
    return tuple(hops)


def read_target(key: str, record: Record | None, health: HealthMap, fallback: str = "",
                spread: int = 0, public: Mapping[str, str] | None = None, *,
                secret: str = "", now: float = 0.0, ttl: int = 0,
                failover: bool = True) -> ReadTarget:
    """Where a GET of `key` should go.

    Prefer replicas in ring order, skipping down volumes; when several are up,
    `spread` (any integer, e.g. a per-request counter) rotates among them so one
    volume does not take every read of a hot key. `public` maps a volume to the base
    URL clients are sent to (docs/design.md, "Placement"); mkv itself always talks to
    the volume's address. With `failover`, the Location names the other usable
    replicas, which the volume goes on to if it lacks the blob (docs/design.md, "Read
    failover"). With `secret`, it is signed until `now` + `ttl` (mkv.signing).
    """
    if record is None or record.state is not State.LIVE:
        if fallback and record is None:
            return Redirect(f"http://{fallback}{quote(key, safe='/')}", None)
        return NotFound()
    up = [v for v in record.volumes if health.get(v, Health.UNKNOWN) is Health.UP]
    candidates = up or [v for v in record.volumes if readable(v, health)]
    if not candidates:
        return Unavailable("every replica's volume is down")
    i = spread % len(candidates)
    volume = candidates[i]
    public = public or {}
    base, prefix = volume_url(volume, public)
    blob = blob_path(key, record.gen)
    path = prefix + blob
    hops: tuple[signing.Hop, ...] = ()
    if failover and len(record.volumes) > 1:
        # the other candidates in the order the rotation would reach them, then the
        # replicas of unknown health, which a read tries only when none is known up
        others = candidates[i + 1:] + candidates[:i]
        others += [v for v in record.volumes if v not in candidates and readable(v, health)]
        hops = failover_hops(base, others, blob, public)
    query = signing.redirect_query(path, hops, now, ttl, secret)
    return Redirect(base + path + query, volume, path, hops)


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


def replaced_copies(old: Record | None, new: Record) -> list[str]:
    """The copies of an UNLINKED or DELETING record that a PUT replacing it leaves
    behind: all of them when the generations differ (other files), else those on
    volumes the new record does not use. Their removal becomes a pending operation."""
    if old is None or old.state is State.LIVE:
        return []
    return [v for v in old.volumes if old.gen != new.gen or v not in new.volumes]


# --- the writer's compare-and-set rules ------------------------------------------------
#
# A writer restart drops every key lock, and a client retrying after it re-takes the lock
# (docs/design.md, "Writer"). Each write therefore may name the record it expects; these
# rules decide, given the record the writer has now, whether the write goes ahead, was
# already made by an earlier try of the same request, or must be refused because another
# client's write got in between.


class Cas(enum.Enum):
    WRITE = "write"        # carry it out
    DONE = "done"          # a retry finds its own write already made: answer ok, change nothing
    CONFLICT = "conflict"  # another write got in: refuse, change nothing


def put_cas(current: Record | None, new: Record, *, expect: Record | None, checked: bool,
            guard_new: bool) -> Cas:
    """Writing `new`. `checked`: only over exactly `expect` (whole records: a PUT that
    slipped in may have the same volumes and other bytes). `guard_new`: a client PUT,
    never over a live key."""
    if checked and current != expect:
        return Cas.DONE if current == new else Cas.CONFLICT
    if guard_new and current is not None and current.state is State.LIVE:
        return Cas.DONE if current == new else Cas.CONFLICT
    return Cas.WRITE


def state_cas(current: Record | None, state: State, *, expect: Record | None, checked: bool) -> Cas:
    """Changing a record's state (its mtime becomes the writer's now). A retry finds the
    same record in the new state with a newer mtime: done."""
    if not checked or current == expect:
        return Cas.WRITE
    if expect is None or current is None:
        return Cas.CONFLICT
    same = dataclasses.replace(current, mtime=expect.mtime) == dataclasses.replace(expect, state=state)
    return Cas.DONE if same else Cas.CONFLICT


def delete_cas(current: Record | None, *, expect: Record | None, checked: bool) -> Cas:
    """Deleting a record; already gone is done."""
    if checked and current is not None and current != expect:
        return Cas.CONFLICT
    return Cas.WRITE


def intents_cover(pending: Sequence[Pending], record: Record) -> bool:
    """May a client PUT record these copies? Only while each is still the write's own
    intent (not made due, or removed, while a writer restart had orphaned it)."""
    mine = {p.volume for p in pending if p.op is PendingOp.REMOVE and p.gen == record.gen
            and p.state in (PendingState.INTENT, PendingState.ORPHANED)}
    return all(v in mine for v in record.volumes)


# --- pending operations ----------------------------------------------------------------


def orphan_grace(volume_timeout: float, client_timeout: float) -> float:
    """How long the intents of a write cut off by a writer restart stay untouched: the
    write may still be streaming, and is refused at its end if they were made due. A
    write slower than this across a restart gets 409, never a record without bytes."""
    return 10 * (volume_timeout + client_timeout)


class PendingAction(enum.Enum):
    DROP = "drop"      # nothing to do any more: forget it
    REMOVE = "remove"  # remove the copy
    MARK = "mark"      # rewrite the copy's sidecar as unlinked


def pending_action(pending: Pending, record: Record | None) -> PendingAction:
    """What a pending operation comes to, under the key's lock, given its record now.

    A copy the record names (its volume and generation) is the record's (a move put it
    there, or the delete machinery owns it): never removed from here. A sidecar is marked only while
    the key is still unlinked with a copy on that volume."""
    named = (record is not None and pending.volume in record.volumes
             and pending.gen == record.gen)
    if pending.op is PendingOp.REMOVE:
        return PendingAction.DROP if named else PendingAction.REMOVE
    if named and record is not None and record.state is State.UNLINKED:
        return PendingAction.MARK
    return PendingAction.DROP


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

    def in_place(self, record: Record) -> bool:
        """Nothing to copy or drop, and the index already names exactly the ring's volumes."""
        return self.noop and tuple(record.volumes) == self.desired


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


def distinct_domains(volumes: Sequence[str]) -> int:
    return len({failure_domain(v) for v in volumes})


def can_write(usable_volumes: Sequence[str], writer_up: bool, replicas: int) -> bool:
    """/-/health's `writable`: a PUT can succeed (the writer answers, R failure domains usable)."""
    return writer_up and distinct_domains(usable_volumes) >= replicas


def can_read(index_readable: bool, usable_volumes: Sequence[str]) -> bool:
    """/-/health's `readable`, its 200: a GET can be answered (the index answers) and a
    stored value can be redirected to somewhere (a volume is not down)."""
    return index_readable and len(usable_volumes) > 0


# --- volume failures -------------------------------------------------------------------


def blamed(errors: Sequence[BaseException | None]) -> list[VolumeError]:
    """The failures that count against their volume. A torn upload is the client's doing and
    a 4xx is the request's; anything else (refused, timed out, 5xx) is the volume's."""
    out = []
    for err in errors:
        if not isinstance(err, VolumeError) or isinstance(err, ShortWrite):
            continue
        if isinstance(err, VolumeStatus) and err.status < 500:
            continue
        out.append(err)
    return out


def reachable_split(record: Record, health: HealthMap) -> tuple[list[str], list[str]]:
    """A record's copies: (to change now, left to a pending operation because their
    volume is down). Used by DELETE and UNLINK."""
    now = [v for v in record.volumes if usable(v, health)]
    return now, [v for v in record.volumes if v not in now]


def copies_left(record: Record, not_tried: Sequence[str], failed: Sequence[str]) -> tuple[str, ...]:
    """After a removal round, the copies a pending delete still names (in record order)."""
    return tuple(v for v in record.volumes if v in not_tried or v in failed)
