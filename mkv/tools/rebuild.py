"""mkv-rebuild: reconstruct the index from nothing but the volumes.

    mkv-rebuild --volumes host:port,... --db NEW_INDEX [--force] [--concurrency N]

Walks every volume's fan-out tree through nginx's autoindex JSON ("/", "/ab/", "/ab/cd/"),
reads each distinct `.key` sidecar once (another replica's only if the first is bad or its
file length differs), merges the replicas of every write, keeps the newest generation of
each key (an older one's copies are reported as superseded) (mkv/tools/scan.py decides;
this module only does the IO), and writes the index into a temporary file beside the target
that is renamed into place at the very end: an interrupted rebuild leaves the old file (or
no file) untouched, never half an index.

Exit codes: 0 clean, 1 problems found (an inconsistency on disk, or a volume that could not
be read: the index is then partial), 2 usage (bad configuration, an index that would be
overwritten without --force, a live `mkv serve` writer on the target).

Speed: a rebuild is one listing per directory per volume plus one sidecar read per key, i.e.
hundreds of thousands of tiny GETs (2.5 per key at 100,000 keys over 3 volumes), so they are
pipelined, a window of requests per round trip, through the volume client (mkv.volumes.pool)
with its patient retry policy; bench/README.md has the figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TextIO
from urllib.parse import quote

import apsw

from mkv import config as config_mod
from mkv.config import Config
from mkv.index import schema
from mkv.model import Pending, PendingOp, PendingState, Record
from mkv.tools.progress import Progress, human_size
from mkv.tools.scan import (
    Candidate,
    KeyResolver,
    Kind,
    Leaf,
    Problem,
    Report,
    merge_dir,
    newest_per_key,
    parse_leaf,
    replication_problems,
    top_dirs,
)
from mkv.volumes.errors import VolumeError, VolumeStatus
from mkv.volumes.pool import PATIENT, Pool
from mkv.writer.lockfile import lock_path, writer_running

PROG = "mkv-rebuild"
DEFAULT_CONCURRENCY = 16
#: Requests sent back to back on one connection before reading the answers.
WINDOW = 64
#: Leaf directories per unit of work (listed on every volume, then their sidecars read).
UNIT_DIRS = 128
#: Rows per SQLite transaction.
BATCH_ROWS = 50_000


class UsageError(Exception):
    """The rebuild must not start: exit 2 with this message."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM mid-rebuild: nothing was written; `stats` is how far it got."""

    def __init__(self, stats: Stats) -> None:
        super().__init__("interrupted")
        self.stats = stats


# --- HTTP: pipelined GETs through the volume client ---------------------------------


class Reads:
    """The rebuild's GETs: pipelined through the volume client with its patient retry
    policy (a volume must be read to the end), and counted for the summary."""

    def __init__(self, timeout: float) -> None:
        self.pool = Pool(timeout, retry=PATIENT)
        self.lock = threading.Lock()
        self.requests = 0
        self.http_s = 0.0

    def get_many(self, volume: str, paths: Sequence[str]) -> list[tuple[int, bytes]]:
        """(status, body) for each path, in order. Raises the VolumeError that stopped them."""
        started = time.perf_counter()
        replies = self.pool.get_many(volume, list(paths), WINDOW)
        with self.lock:
            self.requests += len(paths)
            self.http_s += time.perf_counter() - started
        return [(r.status, r.body) for r in replies]

    def close(self) -> None:
        self.pool.close()


# --- the scan ------------------------------------------------------------------------------


@dataclasses.dataclass
class Stats:
    volumes: int = 0
    volumes_scanned: int = 0
    dirs_total: int = 0
    dirs_done: int = 0
    keys: int = 0
    replicas: int = 0
    bytes: int = 0
    replica_bytes: int = 0
    requests: int = 0
    http_s: float = 0.0  # summed over threads: time spent in HTTP round trips
    scan_s: float = 0.0  # wall time from the first listing to the last sidecar read
    sqlite_s: float = 0.0  # wall time in SQLite (inserts, commit, switch to WAL, fsync)
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return self.keys / self.elapsed if self.elapsed > 0 else 0.0


@dataclasses.dataclass
class Result:
    stats: Stats
    report: Report
    unreachable: dict[str, str]  # volume -> why
    db: str
    written: bool = True  # False when no volume could be read: the target is left alone

    @property
    def partial(self) -> bool:
        return bool(self.unreachable)

    @property
    def exit_code(self) -> int:
        return 1 if self.partial or self.report.total else 0


@dataclasses.dataclass
class UnitResult:
    records: list[Record]
    problems: list[Problem]
    dirs: int
    #: copies of older writes of a key (SUPERSEDED): queued for removal in the new index
    superseded: list[Pending] = dataclasses.field(default_factory=list)


class Scanner:
    """The IO shell around mkv.tools.scan: lists, reads, and hands records to the caller."""

    def __init__(self, cfg: Config, pipes: Reads) -> None:
        self.cfg = cfg
        self.pipes = pipes
        self.ring = cfg.ring()
        self.dead: dict[str, str] = {}
        self.dead_lock = threading.Lock()

    def _fail(self, volume: str, exc: VolumeError) -> None:
        with self.dead_lock:
            self.dead.setdefault(volume, exc.detail)

    def alive(self, volume: str) -> bool:
        return volume not in self.dead

    def _listing(self, volume: str, path: str, status: int, body: bytes,
                 problems: list[Problem]) -> list[dict] | None:
        """Decode one autoindex answer; None (and a problem) if it cannot be used."""
        if status == 404:
            return []
        if status != 200:
            problems.append(Problem(Kind.UNREADABLE, volume, path, f"listing answered {status}"))
            return None
        try:
            entries = json.loads(body)
            if not isinstance(entries, list):
                raise ValueError("not a list")
            return entries
        except ValueError as exc:
            problems.append(Problem(Kind.UNREADABLE, volume, path, f"bad autoindex JSON: {exc}"))
            return None

    def leaf_dirs(self, volume: str) -> tuple[list[str], list[Problem]]:
        """Every "ab/cd" directory of one volume: "/" then each "/ab/", pipelined."""
        problems: list[Problem] = []
        try:
            [(status, body)] = self.pipes.get_many(volume, ["/"])
            if status not in (200, 404):
                raise VolumeStatus(volume, status, "GET", "/")
            root = self._listing(volume, "/", status, body, problems)
            if root is None:
                return [], problems
            tops = top_dirs(root)
            answers = self.pipes.get_many(volume, [f"/{ab}/" for ab in tops])
        except VolumeError as exc:
            self._fail(volume, exc)
            return [], problems
        leaves = []
        for ab, (status, body) in zip(tops, answers, strict=True):
            entries = self._listing(volume, f"/{ab}/", status, body, problems)
            if entries:
                leaves += [f"{ab}/{cd}" for cd in top_dirs(entries)]
        return leaves, problems

    def unit(self, dirs: Sequence[tuple[str, tuple[str, ...]]]) -> UnitResult:
        """List a run of leaf directories on every volume that has them, then decide each key."""
        problems: list[Problem] = []
        leaves: dict[str, dict[str, Leaf]] = defaultdict(dict)
        for volume in self.cfg.volumes:
            mine = [d for d, vols in dirs if volume in vols]
            if not mine or not self.alive(volume):
                continue
            try:
                answers = self.pipes.get_many(volume, [f"/{d}/" for d in mine])
            except VolumeError as exc:
                self._fail(volume, exc)
                continue
            for d, (status, body) in zip(mine, answers, strict=True):
                entries = self._listing(volume, f"/{d}/", status, body, problems)
                if entries is not None:
                    leaves[d][volume] = parse_leaf(d, entries)
        candidates: list[Candidate] = []
        for d, by_volume in leaves.items():
            found, trouble = merge_dir(d, by_volume)
            candidates += found
            problems += trouble
        resolvers = [KeyResolver(c) for c in candidates]
        self._read_sidecars(resolvers)
        records: list[Record] = []
        for r in resolvers:
            rec = r.record(self.ring)
            problems += r.problems
            if rec is not None:
                records.append(rec)
        # every generation of a key is in its leaf directory, hence in this unit
        found = records
        records, superseded = newest_per_key(found)
        problems += superseded
        kept = set(records)
        now = time.time()
        older = [Pending(r.key, v, PendingOp.REMOVE, PendingState.DUE, now, r.gen)
                 for r in found if r not in kept for v in r.volumes]
        with self.dead_lock:
            dead = set(self.dead)
        problems += replication_problems(records, self.cfg.replicas, self.ring, dead)
        return UnitResult(records, problems, len(dirs), older)

    def _read_sidecars(self, resolvers: list[KeyResolver]) -> None:
        """One read per key; more only where a sidecar turned out bad or unreadable."""
        pending = resolvers
        while pending:
            by_volume: dict[str, list[KeyResolver]] = defaultdict(list)
            for r in pending:
                volume = r.next_read()
                if volume is not None:
                    by_volume[volume].append(r)
            for volume, group in by_volume.items():
                if not self.alive(volume):
                    for r in group:
                        r.feed(volume, (Kind.UNREADABLE, f"volume unreachable: {self.dead[volume]}"))
                    continue
                try:
                    answers = self.pipes.get_many(volume, [r.cand.sidecar_path for r in group])
                except VolumeError as exc:
                    self._fail(volume, exc)
                    for r in group:
                        r.feed(volume, (Kind.UNREADABLE, exc.detail))
                    continue
                for r, (status, body) in zip(group, answers, strict=True):
                    r.feed(volume, body if status == 200 else (Kind.UNREADABLE, f"answered {status}"))
            pending = [r for group in by_volume.values() for r in group if not r.done]


# --- the index file ------------------------------------------------------------------------


def index_has_content(path: str) -> bool:
    """True if `path` holds anything a rebuild must not silently replace.

    A missing or zero-byte file, or an mkv index without keys, is fine to write. A WAL with
    frames, an unreadable file or anything that is not an mkv index counts as content. The
    file is opened immutable and read-only, so checking leaves no -wal/-shm behind.
    """
    if not os.path.exists(path):
        return False
    wal = path + "-wal"
    if os.path.exists(wal) and os.path.getsize(wal) > 0:
        return True
    if os.path.getsize(path) == 0:
        return False
    try:
        conn = apsw.Connection(f"file:{quote(os.path.abspath(path))}?immutable=1",
                               flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
        try:
            return conn.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is not None
        finally:
            conn.close()
    except apsw.Error:
        return True


def temp_path(target: str) -> str:
    head, tail = os.path.split(os.path.abspath(target))
    return os.path.join(head, f".{tail}.rebuild-{os.getpid()}.tmp")


def remove_db_files(path: str) -> None:
    for p in (path, path + "-wal", path + "-shm", path + "-journal"):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def open_temp_index(path: str) -> apsw.Connection:
    """A fresh index for bulk loading: no journal, no syncs (the file is thrown away on
    failure, and made durable once, at the end)."""
    remove_db_files(path)
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    schema.init_schema(conn)
    return conn


def finish_index(conn: apsw.Connection, tmp: str, target: str, meta: dict[str, str]) -> None:
    """Make the temporary index durable and put it in place of `target` atomically."""
    with conn:
        conn.executemany("INSERT OR REPLACE INTO meta VALUES(?, ?)", list(meta.items()))
    conn.execute("PRAGMA journal_mode=WAL")  # what every mkv process expects; sticks to the file
    conn.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    replace_file(tmp, target)


def replace_file(tmp: str, target: str) -> None:
    """rename(2) `tmp` over `target`, dropping the target's WAL and shared memory first:
    an old WAL beside a new database would be replayed into it."""
    for stale in (target + "-wal", target + "-shm"):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    os.replace(tmp, target)
    fd = os.open(os.path.dirname(os.path.abspath(target)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_target(cfg: Config, db: str, force: bool) -> None:
    """Raise UsageError if writing `db` could hurt a running service or an existing index."""
    if writer_running(db):
        raise UsageError(
            f"a live mkv writer holds {lock_path(db)}: `mkv serve` is using {db}. "
            "Stop the service first, or rebuild into another --db and swap the files "
            "while the service is stopped")
    if index_has_content(db) and not force:
        raise UsageError(f"{db} already holds an index (or something else); "
                         "pass --force to replace it, or choose another --db")


# --- progress and summary ------------------------------------------------------------------


def progress_line(stats: Stats, started: float, problems: int) -> str:
    took = time.monotonic() - started
    rate = stats.keys / took if took > 0 else 0.0
    return (f"{PROG}: volumes {stats.volumes_scanned}/{stats.volumes}, "
            f"dirs {stats.dirs_done}/{stats.dirs_total}, keys {stats.keys}, "
            f"{rate:,.0f} keys/s, problems {problems}, {took:.1f}s")


def summary(result: Result) -> list[str]:
    s, r = result.stats, result.report
    lines = [
        f"{PROG}: {s.keys} keys, {s.replicas} replicas, {human_size(s.bytes)} of values "
        f"({human_size(s.replica_bytes)} with replicas) in {s.elapsed:.1f}s ({s.rate:,.0f} keys/s)",
        f"{PROG}: scanned {s.volumes_scanned}/{s.volumes} volumes, {s.dirs_done} directories, "
        f"{s.requests} requests; HTTP {s.scan_s:.1f}s wall, SQLite {s.sqlite_s:.1f}s",
    ]
    if r.total:
        lines.append(f"{PROG}: problems: {r.total} (bad or superseded copies are left out of "
                     "the index; keys short of replicas are in it)")
        lines += r.lines()
    else:
        lines.append(f"{PROG}: problems: none")
    if result.partial:
        down = ", ".join(f"{v} ({why})" for v, why in sorted(result.unreachable.items()))
        lines.append(f"{PROG}: PARTIAL result: could not read {down}; keys held only there are "
                     "missing and others lack those replicas. Rerun when the volume is back.")
    if not result.written:
        lines.append(f"{PROG}: no volume could be read: index NOT written, {result.db} left as it was")
        return lines
    lines.append(f"{PROG}: index written to {result.db}" + (
        " (partial)" if result.partial else "" if not r.total else " (with the problems above)"))
    return lines


# --- the rebuild ---------------------------------------------------------------------------


def rebuild(cfg: Config, db: str, *, force: bool = False, concurrency: int = DEFAULT_CONCURRENCY,
            err: TextIO = sys.stderr, progress: bool = True) -> Result:
    """Scan the volumes and write the index to `db`. Raises UsageError before doing anything
    if the target is in use or would be overwritten without `force`."""
    check_target(cfg, db, force)
    started = time.monotonic()
    stats = Stats(volumes=len(cfg.volumes))
    report = Report()
    show = Progress(err, progress)
    pipes = Reads(cfg.volume_timeout)
    scanner = Scanner(cfg, pipes)
    tmp = temp_path(db)
    conn: apsw.Connection | None = None
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="rebuild")
    written = finished = False
    try:
        conn = open_temp_index(tmp)
        # 1. the fan-out directories of every volume
        where: dict[str, list[str]] = defaultdict(list)
        for volume, fut in [(v, pool.submit(scanner.leaf_dirs, v)) for v in cfg.volumes]:
            leaves, problems = fut.result()
            report.add(problems)
            for d in leaves:
                where[d].append(volume)
        stats.volumes_scanned = sum(1 for v in cfg.volumes if scanner.alive(v))
        dirs = sorted((d, tuple(vols)) for d, vols in where.items())
        stats.dirs_total = len(dirs)

        # 2. every leaf directory and its keys, a unit of UNIT_DIRS at a time
        units: set[Future] = {pool.submit(scanner.unit, dirs[i:i + UNIT_DIRS])
                              for i in range(0, len(dirs), UNIT_DIRS)}
        batch: list[Record] = []
        older: list[Pending] = []
        while units:
            finished, units = wait(units, timeout=show.interval, return_when=FIRST_COMPLETED)
            for fut in finished:
                out = fut.result()
                report.add(out.problems)
                stats.dirs_done += out.dirs
                for rec in out.records:
                    stats.keys += 1
                    stats.replicas += len(rec.volumes)
                    stats.bytes += rec.size
                    stats.replica_bytes += rec.size * len(rec.volumes)
                batch += out.records
                older += out.superseded
            if len(batch) >= BATCH_ROWS:
                stats.sqlite_s += _insert(conn, batch, older)
                batch, older = [], []
            show.show(progress_line(stats, started, report.total))
        stats.scan_s = time.monotonic() - started
        stats.sqlite_s += _insert(conn, batch, older)
        show.show(progress_line(stats, started, report.total), force=True)
        show.end()

        # 3. durable, then in place
        for volume, why in sorted(scanner.dead.items()):
            report.add([Problem(Kind.UNREACHABLE, volume, "", why)])
        stats.volumes_scanned = sum(1 for v in cfg.volumes if scanner.alive(v))
        if stats.volumes_scanned:  # with none, an empty index would only hide the outage
            t = time.monotonic()
            finish_index(conn, tmp, db, {
                "rebuilt_at": f"{time.time():.3f}",
                "rebuild_volumes": ",".join(cfg.volumes),
                "rebuild_partial": ",".join(sorted(scanner.dead)),
            })
            stats.sqlite_s += time.monotonic() - t
            written = True
        finished = True
    except KeyboardInterrupt as exc:
        stats.elapsed = time.monotonic() - started
        raise Interrupted(stats) from exc
    finally:
        show.end()
        pool.shutdown(wait=finished, cancel_futures=True)
        pipes.close()
        if not written:  # interrupted, failed, or nothing to write: no half index anywhere
            if conn is not None:
                try:
                    conn.close()
                except apsw.Error:
                    pass
            remove_db_files(tmp)
    stats.requests, stats.http_s = pipes.requests, pipes.http_s
    stats.elapsed = time.monotonic() - started
    return Result(stats, report, dict(scanner.dead), db, written=written)


def _insert(conn: apsw.Connection, records: list[Record], superseded: list[Pending]) -> float:
    """One transaction; sorted by key so the B-tree fills mostly at its right edge. The
    superseded copies become due removals: the health process of the service that opens
    this index removes them (docs/design.md, "Pending operations")."""
    if not records and not superseded:
        return 0.0
    t = time.monotonic()
    records.sort(key=lambda r: r.key.encode())
    with conn:
        schema.write_records(conn, records)
        schema.write_pending(conn, superseded)
    return time.monotonic() - t


def add_arguments(parser) -> None:  # noqa: ANN001 - a mkv.config.Parser
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="threads listing directories and reading sidecars in parallel")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing non-empty index at --db "
                             "(only on the command line)")
    parser.add_argument("--quiet", "--no-progress", dest="no_progress", action="store_true",
                        help="no progress lines on stderr")


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    cfg, ns = config_mod.load(
        argv, prog=PROG,
        description="Rebuild the mkv index from the volumes' blobs and .key sidecars. "
                    "Exit 0 clean, 1 problems found or volumes unreachable (partial), 2 usage.",
        extend=add_arguments)
    if ns.concurrency < 1:
        print(f"{PROG}: config: concurrency: must be at least 1", file=sys.stderr)
        return 2
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # clean up the temporary file on kill
    try:
        result = rebuild(cfg, cfg.db, force=ns.force, concurrency=ns.concurrency,
                         progress=not ns.no_progress)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        s = exc.stats
        print(f"{PROG}: interrupted after {s.elapsed:.1f}s: {s.dirs_done}/{s.dirs_total} "
              f"directories of {s.volumes_scanned}/{s.volumes} volumes scanned, {s.keys} keys "
              f"found; index not written, {cfg.db} left as it was", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {cfg.db} left as it was", file=sys.stderr)
        return 130
    for line in summary(result):
        print(line, file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
