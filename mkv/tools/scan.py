"""Pure decisions of mkv-rebuild: what a volume listing holds, and what each key becomes.

No IO here. The rebuild shell (mkv/tools/rebuild.py) lists directories and reads sidecars;
these functions turn what it saw into index records and a list of problems:

    parse_leaf      one leaf directory's autoindex entries -> blobs, sidecars, stray names
    merge_dir       the same leaf directory on every volume -> candidates (one write's file
                    id + the replicas that hold its blob and sidecar) and problems
                    (half-written replicas)
    KeyResolver     one candidate: which replica's sidecar to read next, and once one decoded,
                    the record (volumes in ring order) plus the replicas left out and why
    newest_per_key  the records of one leaf directory -> one per key, the newest generation;
                    the older generations' replicas are reported as superseded
    replication_problems  the kept records with fewer replicas than asked for

A write's files are named by its "file id": `<h>` (written before generations) or
`<h>.<gen>` (mkv.keys.blob_path), with h the key's sha256; the sidecar adds ".key". Two
generations of one key may sit side by side (a newer write's old copies that cleanup has not
removed yet): each is its own candidate, and only blob and sidecar of the same file id make
a replica.

Per-file work is kept to one regex match and a dict insert: the rebuild walks every file of
every volume, so this is the hot loop.
"""

from __future__ import annotations

import calendar
import dataclasses
import enum
import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence

from mkv.keys import blob_path, gen_order, key_hash
from mkv.model import Record, State
from mkv.ring import Ring

HEX = "0123456789abcdef"
#: The 256 names a fan-out directory may have.
FANOUT = frozenset(a + b for a in HEX for b in HEX)
HASH_LEN = 64
SIDECAR_SUFFIX = ".key"
#: A name mkv writes in a leaf directory: file id (hash, then "." and a generation of 1-32
#: lowercase hex digits, as mkv.keys.GEN_RE), then ".key" for a sidecar. One regex match per
#: file costs no more than the equivalent string tests (measured).
_NAME = re.compile(r"([0-9a-f]{64}(?:\.[0-9a-f]{1,32})?)(\.key)?\Z")


class Kind(enum.Enum):
    """What can be wrong on a volume; every problem the rebuild reports has one."""

    BLOB_WITHOUT_SIDECAR = "blob without sidecar (unfinished write)"
    SIDECAR_WITHOUT_BLOB = "sidecar without blob"
    CORRUPT_SIDECAR = "corrupt sidecar JSON"
    WRONG_HASH = "sidecar key does not hash to its file name"
    SIZE_MISMATCH = "blob size differs from its sidecar"
    CONFLICT = "sidecar disagrees with the other replicas' sidecar"
    SUPERSEDED = "an older write's copies, left out of the index"
    UNREADABLE = "could not read (vanished or error status)"
    STRAY = "unexpected name in the fan-out tree"
    SINGLE_COPY = ("restored from a single copy, its other replicas missing "
                   "(a delete whose cleanup never ran looks like this)")
    UNDER_REPLICATED = "key has fewer replicas than --replicas"
    UNREACHABLE = "volume unreachable (its keys are missing: partial result)"


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    kind: Kind
    volume: str
    path: str
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.volume} {self.path}".rstrip()
        return f"{where}: {self.detail}" if self.detail else where


def top_dirs(entries: Iterable[Mapping]) -> list[str]:
    """The fan-out directories in a listing of "/" or "/ab/"; other names are ignored."""
    return sorted(e["name"] for e in entries
                  if e.get("type") == "directory" and e.get("name") in FANOUT)


@dataclasses.dataclass(slots=True)
class Leaf:
    """One leaf directory ("ab/cd") of one volume, by file id (`<h>` or `<h>.<gen>`)."""

    blobs: dict[str, tuple[int, str]]  # file id -> (size, mtime as nginx prints it)
    sidecars: dict[str, int]  # file id -> size of the sidecar file
    strays: list[str]


def parse_leaf(dirpath: str, entries: Iterable[Mapping]) -> Leaf:
    """Sort one leaf directory's autoindex entries; `dirpath` is "ab/cd".

    A blob is named by its file id: 64 hex digits starting with the directory's own four,
    optionally followed by "." and a generation (1-32 lowercase hex digits); its sidecar by
    the same plus ".key". Any other name is stray: nothing mkv writes, reported and otherwise
    ignored.
    """
    start = dirpath[0:2] + dirpath[3:5]
    blobs: dict[str, tuple[int, str]] = {}
    sidecars: dict[str, int] = {}
    strays: list[str] = []
    match = _NAME.match
    for e in entries:
        name = e["name"]
        m = match(name)
        if m is None or not name.startswith(start) or e.get("type") != "file":
            strays.append(name)
            continue
        fid, sidecar = m.groups()
        if sidecar:
            sidecars[fid] = e.get("size", 0)
        else:
            blobs[fid] = (e.get("size", 0), e.get("mtime", ""))
    return Leaf(blobs, sidecars, strays)


@dataclasses.dataclass(slots=True)
class Candidate:
    """One write (a hash and a generation) with at least one replica holding both its blob
    and its sidecar."""

    hash: str
    dirpath: str  # "ab/cd"
    # (volume, blob size, blob mtime, sidecar size), in listing order
    replicas: list[tuple[str, int, str, int]]
    gen: str = ""  # "": files written before generations, named by the hash alone

    @property
    def file_id(self) -> str:
        return f"{self.hash}.{self.gen}" if self.gen else self.hash

    @property
    def blob_path(self) -> str:
        return f"/{self.dirpath}/{self.file_id}"

    @property
    def sidecar_path(self) -> str:
        return f"/{self.dirpath}/{self.file_id}{SIDECAR_SUFFIX}"


def merge_dir(dirpath: str, leaves: Mapping[str, Leaf]) -> tuple[list[Candidate], list[Problem]]:
    """One leaf directory as every volume lists it -> candidates and half-written replicas.

    A replica counts only when its volume has both files of one file id: the sidecar is
    written after the blob is complete, so a blob alone is an unfinished write and a sidecar
    alone has lost its bytes. Either is reported for that volume and left out. A blob of one
    generation and a sidecar of another are two such halves, not a replica.
    """
    problems: list[Problem] = []
    found: dict[str, list[tuple[str, int, str, int]]] = {}
    for volume, leaf in leaves.items():
        blobs, sidecars = leaf.blobs, leaf.sidecars
        for name in leaf.strays:
            problems.append(Problem(Kind.STRAY, volume, f"/{dirpath}/{name}"))
        for fid, (size, mtime) in blobs.items():
            sidecar_size = sidecars.get(fid)
            if sidecar_size is not None:
                replicas = found.get(fid)
                if replicas is None:
                    found[fid] = [(volume, size, mtime, sidecar_size)]
                else:
                    replicas.append((volume, size, mtime, sidecar_size))
            else:
                problems.append(Problem(Kind.BLOB_WITHOUT_SIDECAR, volume, f"/{dirpath}/{fid}",
                                        f"{size} bytes"))
        for fid in sorted(sidecars.keys() - blobs.keys()):
            problems.append(Problem(Kind.SIDECAR_WITHOUT_BLOB, volume,
                                    f"/{dirpath}/{fid}{SIDECAR_SUFFIX}"))
    return [Candidate(fid[:HASH_LEN], dirpath, r, fid[HASH_LEN + 1:])
            for fid, r in found.items()], problems


@dataclasses.dataclass(frozen=True, slots=True)
class Sidecar:
    key: str
    size: int
    md5: str
    # replicas agree on the value; a failed rewrite at UNLINK may leave one behind on this
    unlinked: bool = dataclasses.field(default=False, compare=False)


def decode_sidecar(h: str, body: bytes) -> Sidecar | tuple[Kind, str]:
    """A sidecar's JSON, checked: a Sidecar, or (kind, detail) saying what is wrong."""
    try:
        doc = json.loads(body)
    except ValueError as exc:  # also UnicodeDecodeError
        return Kind.CORRUPT_SIDECAR, f"not JSON: {exc}"
    if not isinstance(doc, dict):
        return Kind.CORRUPT_SIDECAR, "not a JSON object"
    key, size, md5 = doc.get("key"), doc.get("size"), doc.get("md5")
    if not isinstance(key, str) or not key:
        return Kind.CORRUPT_SIDECAR, "no key"
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return Kind.CORRUPT_SIDECAR, f"bad size {size!r}"
    if not isinstance(md5, str):
        return Kind.CORRUPT_SIDECAR, f"bad md5 {md5!r}"
    if key_hash(key) != h:
        return Kind.WRONG_HASH, f"key {key!r} hashes to {key_hash(key)}"
    return Sidecar(key, size, md5, doc.get("unlinked") is True)


_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_mtime_cache: dict[str, float] = {}


def parse_mtime(text: str) -> float:
    """nginx's autoindex mtime ("Sun, 29 Nov 2026 10:43:13 GMT") as a Unix time; 0 if odd.

    Many files share a second, so results are cached (the cache is bounded).
    """
    t = _mtime_cache.get(text)
    if t is None:
        try:
            _, day, mon, year, hms, _ = text.split(" ")
            hh, mm, ss = hms.split(":")
            t = float(calendar.timegm((int(year), _MONTHS[mon], int(day), int(hh), int(mm), int(ss))))
        except (ValueError, KeyError):
            t = 0.0
        if len(_mtime_cache) > 100_000:
            _mtime_cache.clear()
        _mtime_cache[text] = t
    return t


def ring_order(ring: Ring, key: str, held: Sequence[str]) -> tuple[str, ...]:
    """The volumes that hold `key`, in ring order (the index's `volumes` column)."""
    if len(held) <= 1:
        return tuple(held)
    want = set(held)
    placed = ring.place(key, len(want))  # usual case: the key sits where the ring puts it
    if len(placed) == len(want) and want.issuperset(placed):
        return tuple(placed)
    out = [v for v in ring.walk(key) if v in want]
    if len(out) < len(want):  # volumes outside the ring (should not happen): keep them, last
        out += sorted(want.difference(out))
    return tuple(out)


class KeyResolver:
    """Decide one candidate, reading as few sidecars as possible: one in the usual case.

    Call `next_read()` for the volume whose sidecar to read (None: decided), `feed()` the
    bytes read (or a `(Kind, detail)` if the read failed), repeat; then `record()`.

    The replicas are tried most common (blob size, sidecar size) first, so the one read
    usually agrees with the majority. The first sidecar that decodes and hashes right decides
    key, size and md5. A replica whose sidecar could not be read or is bad is reported and
    left out, and the next one is read instead. Replicas whose sidecar file has another
    length than the one decided are read too (free to spot in the listing) and left out
    unless they say the same. Then each replica whose blob size differs from the sidecar's
    is a size mismatch, reported and left out.
    """

    __slots__ = ("cand", "queue", "verify", "sidecar", "bad", "problems")

    def __init__(self, cand: Candidate) -> None:
        self.cand = cand
        reps = cand.replicas
        if len(reps) > 1:
            # Spread the reads over the volumes: start at a hash-chosen replica.
            shift = int(cand.hash[4:8], 16) % len(reps)
            reps = reps[shift:] + reps[:shift]
            shapes = [(r[1], r[3]) for r in reps]
            if shapes.count(shapes[0]) != len(shapes):
                best = max(shapes, key=shapes.count)  # first of the most common, in read order
                reps = [r for r in reps if (r[1], r[3]) == best] + \
                       [r for r in reps if (r[1], r[3]) != best]
        self.queue: list[str] = [r[0] for r in reps]
        self.verify: list[str] | None = None  # replicas to read after the deciding one
        self.sidecar: Sidecar | None = None
        self.bad: set[str] = set()
        self.problems: list[Problem] = []

    def next_read(self) -> str | None:
        if self.sidecar is None:
            return self.queue[0] if self.queue else None
        return self.verify[0] if self.verify else None

    @property
    def done(self) -> bool:
        return self.next_read() is None

    def _bad(self, volume: str, kind: Kind, detail: str) -> None:
        self.bad.add(volume)
        self.problems.append(Problem(kind, volume, self.cand.sidecar_path, detail))

    def feed(self, volume: str, outcome: bytes | tuple[Kind, str]) -> None:
        decoded = outcome if isinstance(outcome, tuple) else decode_sidecar(self.cand.hash, outcome)
        if self.sidecar is None:
            self.queue.remove(volume)
            if isinstance(decoded, Sidecar):
                self.sidecar = decoded
                length = len(outcome)  # type: ignore[arg-type]
                self.verify = [r[0] for r in self.cand.replicas
                               if r[3] != length and r[0] in self.queue]
            else:
                self._bad(volume, *decoded)
            return
        assert self.verify is not None
        self.verify.remove(volume)
        if not isinstance(decoded, Sidecar):
            self._bad(volume, *decoded)
        elif decoded != self.sidecar:
            self._bad(volume, Kind.CONFLICT,
                      f"size {decoded.size} md5 {decoded.md5!r}, the others say "
                      f"size {self.sidecar.size} md5 {self.sidecar.md5!r}")

    def record(self, ring: Ring) -> Record | None:
        """The key's record (None if no replica survived); adds size mismatches to problems."""
        sc = self.sidecar
        if sc is None:
            return None
        held: list[str] = []
        mtime = 0.0
        for volume, size, blob_mtime, _ in self.cand.replicas:
            if volume in self.bad:
                continue
            if size != sc.size:
                self.problems.append(Problem(
                    Kind.SIZE_MISMATCH, volume, self.cand.blob_path,
                    f"blob {size} bytes, sidecar says {sc.size} (key {sc.key!r})"))
                continue
            held.append(volume)
            mtime = max(mtime, parse_mtime(blob_mtime))
        if not held:
            return None
        state = State.UNLINKED if sc.unlinked else State.LIVE
        return Record(sc.key, state, ring_order(ring, sc.key, held), sc.size, sc.md5, mtime,
                      self.cand.gen)


def _gen_name(gen: str) -> str:
    return f"gen {gen}" if gen else "no gen (written before generations)"


def newest_per_key(records: Sequence[Record]) -> tuple[list[Record], list[Problem]]:
    """One record per key: the newest generation (mkv.keys.gen_order) among those that made
    a record. Every other generation's replicas are SUPERSEDED problems, one per volume, at
    that generation's blob path. All generations of a key share its leaf directory, so the
    records of whole leaf directories are enough.
    """
    newest: dict[str, Record] = {}
    older: list[Record] = []
    for rec in records:
        cur = newest.get(rec.key)
        if cur is None:
            newest[rec.key] = rec
        elif gen_order(rec.gen) > gen_order(cur.gen):
            newest[rec.key] = rec
            older.append(cur)
        else:
            older.append(rec)
    if not older:  # the usual case: one generation per key
        return list(records), []
    problems = []
    for rec in older:
        kept = newest[rec.key]
        path = blob_path(rec.key, rec.gen)
        detail = (f"{_gen_name(rec.gen)}, {rec.size} bytes md5 {rec.md5!r} "
                  f"(key {rec.key!r}); the index keeps {_gen_name(kept.gen)}")
        problems += [Problem(Kind.SUPERSEDED, volume, path, detail) for volume in rec.volumes]
    return list(newest.values()), problems


def replication_problems(records: Iterable[Record], replicas: int, ring: Ring | None = None,
                         unreachable: Collection[str] = ()) -> list[Problem]:
    """Keys with fewer replicas than `replicas`. A key found on one volume only, when more
    were asked for, is SINGLE_COPY: the operator must be able to tell it apart, as that is
    also what a key whose DELETE never finished removing its copies looks like (brought
    back to life by the rebuild). Two to `replicas`-1 copies are UNDER_REPLICATED.

    Given the `ring` and the volumes that could not be read, the detail names those of the
    key's placement among them: its missing copies may just not have been read.
    """
    problems = []
    for rec in records:
        n = len(rec.volumes)
        if n < replicas:
            kind = Kind.SINGLE_COPY if n == 1 else Kind.UNDER_REPLICATED
            detail = f"{n} of {replicas}"
            if unreachable and ring is not None:
                unread = [v for v in ring.place(rec.key, replicas)
                          if v in unreachable and v not in rec.volumes]
                if unread:
                    detail += f", not read from {','.join(unread)} (unreachable)"
            problems.append(Problem(kind, ",".join(rec.volumes), rec.key, detail))
    return problems


@dataclasses.dataclass
class Report:
    """Problems by kind: a count and the first few, for the summary."""

    keep: int = 5
    counts: dict[Kind, int] = dataclasses.field(default_factory=dict)
    samples: dict[Kind, list[Problem]] = dataclasses.field(default_factory=dict)

    def add(self, problems: Iterable[Problem]) -> None:
        for p in problems:
            self.counts[p.kind] = self.counts.get(p.kind, 0) + 1
            sample = self.samples.setdefault(p.kind, [])
            if len(sample) < self.keep:
                sample.append(p)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        out = []
        for kind in Kind:  # stable order, the enum's
            n = self.counts.get(kind, 0)
            if not n:
                continue
            out.append(f"  {kind.value}: {n}")
            out += [f"    {p}" for p in self.samples[kind]]
            if n > len(self.samples[kind]):
                out.append(f"    ... and {n - len(self.samples[kind])} more")
        return out
