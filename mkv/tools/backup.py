"""mkv backup: an online, consistent copy of the index while the service writes.

    mkv backup DEST [--force] [--step-pages N]    (plus the usual --config, --db, MKV_*)

SQLite's backup API (apsw `Connection.backup`) copies the index page by page into a
temporary file beside DEST (`.<name>.backup-<pid>.tmp`). The copy is checked with
`PRAGMA integrity_check`, made durable, and renamed over DEST at the very end, so an
interrupted or failed backup leaves DEST as it was (or absent), never half a file.

Consistency: the source connection holds one read transaction from before the first
page to after the last. The index is in WAL mode (docs/design.md, "Index"), where a
reader never blocks the writer: the service's commits go on landing in the WAL, past
this snapshot, and the copy is the index as it was when the backup began. Without that
transaction SQLite restarts a backup from page 1 whenever another process commits
between two steps, and under a steady write load a stepped backup might never end.
While the snapshot is held, checkpoints cannot move past it, so the WAL grows by what
is written meanwhile and is folded back by the first checkpoint after the backup.

Steps: each `step` call copies `--step-pages` pages and returns, so no single call
holds the source's locks for the whole file, progress is shown between steps, and
Ctrl-C or SIGTERM stops the copy at the next step boundary (and removes the temporary
file).

`--force` is taken from the command line only: an MKV_FORCE in the environment or a
`force` line in the config file is refused (mkv.config.COMMAND_LINE_ONLY), because a
setting that makes every backup overwrite its target is too easy to leave behind.

Exit codes: 0 the copy is at DEST; 1 the backup failed (DEST untouched); 2 usage (bad
configuration, no index at `db`, DEST exists without --force, DEST's directory missing).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from pathlib import Path

import apsw
import configargparse

from mkv import config as config_mod
from mkv.model import State
from mkv.tools.progress import Progress, human_size

PROG = "mkv backup"
#: 1024 pages of 4 KiB: 4 MiB per step, a few milliseconds of copying.
DEFAULT_STEP_PAGES = 1024
#: Seconds the source connection waits for a lock (the writer's checkpoint, a recovery).
BUSY_TIMEOUT_MS = 10_000


class UsageError(Exception):
    """The backup cannot start as asked (exit 2); nothing was written."""


class BackupFailed(Exception):
    """The backup started and did not finish (exit 1); DEST is untouched."""


@dataclasses.dataclass(frozen=True)
class Counts:
    """What the copy holds: rows of `keys` by state, and the sum of their values' sizes."""

    keys: int
    live: int
    unlinked: int
    deleting: int
    value_bytes: int


@dataclasses.dataclass(frozen=True)
class Result:
    dest: Path
    counts: Counts
    file_bytes: int
    pages: int
    seconds: float


# --- the destination ------------------------------------------------------------------------


def check_dest(dest: Path, db: Path, force: bool) -> Path:
    """DEST as an absolute path, or UsageError saying why it cannot be written."""
    dest = dest.absolute()
    if not dest.parent.is_dir():
        raise UsageError(f"cannot write {dest}: directory {dest.parent} does not exist")
    if not os.access(dest.parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {dest}: directory {dest.parent} is not writable")
    if dest.is_dir():
        raise UsageError(f"{dest} is a directory; name the backup file, e.g. {dest}/index.db")
    if dest.exists():
        if db.exists() and os.path.samefile(dest, db):
            raise UsageError(f"{dest} is the index itself; choose another destination")
        if not force:
            raise UsageError(f"{dest} exists; pass --force to replace it")
    return dest


def temp_path(dest: Path) -> Path:
    """Beside DEST, so the final rename stays on one filesystem (and is atomic)."""
    return dest.with_name(f".{dest.name}.backup-{os.getpid()}.tmp")


def remove_db_files(path: Path) -> None:
    for p in (path, *(path.with_name(path.name + s) for s in ("-journal", "-wal", "-shm"))):
        p.unlink(missing_ok=True)


def keep_owner(db: Path) -> None:
    """Give the index's -wal and -shm back to the index's owner.

    Reading a WAL database creates them if they are missing (the service is stopped), and
    a backup run by root would leave root's files beside the index, which the service's
    user then cannot open.
    """
    if os.geteuid() != 0:
        return
    st = db.stat()
    for suffix in ("-wal", "-shm"):
        side = db.with_name(db.name + suffix)
        try:
            if os.stat(side).st_uid != st.st_uid:
                os.chown(side, st.st_uid, st.st_gid)
        except FileNotFoundError:
            pass


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the copy -------------------------------------------------------------------------------


def open_source(db: Path) -> apsw.Connection:
    """The index, read-only, with a read transaction open: the snapshot the copy is of."""
    if not db.is_file():
        raise UsageError(f"no index at {db} (the `db` of the configuration)")
    try:
        conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
        conn.set_busy_timeout(BUSY_TIMEOUT_MS)
        conn.execute("BEGIN")
        # a deferred BEGIN takes its snapshot at the first read
        conn.execute("SELECT count(*) FROM keys").fetchone()
    except apsw.SQLError as exc:
        raise UsageError(f"{db} is not an mkv index: {exc}") from None
    except apsw.Error as exc:
        raise UsageError(f"cannot read the index {db}: {exc}") from None
    return conn


def count(conn: apsw.Connection) -> Counts:
    rows = dict(conn.execute("SELECT state, count(*) FROM keys GROUP BY state").fetchall())
    total, value_bytes = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM keys").fetchone()
    return Counts(keys=total, live=rows.get(int(State.LIVE), 0),
                  unlinked=rows.get(int(State.UNLINKED), 0),
                  deleting=rows.get(int(State.DELETING), 0), value_bytes=value_bytes)


def copy_pages(source: apsw.Connection, tmp: Path, step_pages: int, show: Progress) -> int:
    """Copy `source` into a new file `tmp`, `step_pages` at a time; returns the page count."""
    dest = apsw.Connection(str(tmp), flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)
    try:
        with dest.backup("main", source, "main") as backup:
            while not backup.done:
                backup.step(step_pages)
                done = backup.pagecount - backup.remaining
                show.show(f"{PROG}: {done}/{backup.pagecount} pages")
            pages = backup.pagecount
        show.show(f"{PROG}: {pages}/{pages} pages", force=True)
        show.end()
        return pages
    finally:
        dest.close()


def verify_copy(tmp: Path) -> Counts:
    """Check the copy page by page, count what it holds, and leave it in WAL mode (as
    every mkv process expects: the header says so, and restoring it is a plain copy)."""
    conn = apsw.Connection(str(tmp), flags=apsw.SQLITE_OPEN_READWRITE)
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise BackupFailed("the copy failed its integrity check: " + "; ".join(problems[:5]))
        counts = count(conn)
        conn.execute("PRAGMA journal_mode=WAL")
        return counts
    finally:
        conn.close()  # the last connection: its -wal and -shm go with it


def backup(db: Path, dest: Path, *, force: bool = False, step_pages: int = DEFAULT_STEP_PAGES,
           show: Progress | None = None) -> Result:
    """Copy the index at `db` to `dest`, telling `show` how far it got after every step.
    UsageError before anything is written; BackupFailed (or KeyboardInterrupt) after,
    with the temporary file removed and `dest` untouched."""
    db = db.absolute()
    dest = check_dest(dest, db, force)
    started = time.monotonic()
    source = open_source(db)
    tmp = temp_path(dest)
    placed = False
    try:
        remove_db_files(tmp)
        pages = copy_pages(source, tmp, step_pages, show or Progress(sys.stderr))
        source.execute("COMMIT")  # the snapshot is no longer needed: let checkpoints go on
        counts = verify_copy(tmp)
        _fsync(tmp)
        os.replace(tmp, dest)
        placed = True
        _fsync(dest.parent)
    except apsw.Error as exc:
        raise BackupFailed(f"copying {db} to {dest} failed: {exc}") from None
    except OSError as exc:
        raise BackupFailed(f"writing {dest} failed: {exc}") from None
    finally:
        source.close()
        keep_owner(db)
        if not placed:
            remove_db_files(tmp)
    return Result(dest, counts, dest.stat().st_size, pages, time.monotonic() - started)


# --- the command ----------------------------------------------------------------------------


def summary(result: Result) -> str:
    c = result.counts
    return (f"{PROG}: {result.dest}: {c.keys} keys ({c.live} live, {c.unlinked} unlinked, "
            f"{c.deleting} deleting), {c.value_bytes} bytes of values ({human_size(c.value_bytes)}); "
            f"file {result.file_bytes} bytes ({human_size(result.file_bytes)}, {result.pages} pages) "
            f"in {result.seconds:.1f}s")


def add_arguments(p: configargparse.ArgumentParser) -> None:
    p.add_argument("dest", metavar="DEST", help="the backup file to write")
    p.add_argument("--force", action="store_true",
                   help="replace DEST if it exists (command line only)")
    p.add_argument("--step-pages", type=int, default=DEFAULT_STEP_PAGES,
                   help="pages copied per backup step")
    p.add_argument("--quiet", "--no-progress", dest="no_progress", action="store_true",
                   help="no progress lines on stderr (the summary is still printed)")


def main(argv: list[str] | None = None) -> int:
    cfg, ns = config_mod.load(
        argv, prog=PROG, extend=add_arguments, need_volumes=False,
        description="Copy the index to DEST while the service runs (SQLite's backup API). "
                    "Exit 0 copied, 1 failed (DEST untouched), 2 usage.")
    force = ns.force  # from the command line only (config.COMMAND_LINE_ONLY)
    if ns.step_pages < 1:
        print(f"{PROG}: config: step-pages: must be at least 1", file=sys.stderr)
        return 2
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # clean up the temporary file on kill
    try:
        result = backup(Path(cfg.db), Path(ns.dest), force=force, step_pages=ns.step_pages,
                        show=Progress(sys.stderr, not ns.no_progress))
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except BackupFailed as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {ns.dest} left as it was", file=sys.stderr)
        return 1
    print(summary(result))
    return 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
