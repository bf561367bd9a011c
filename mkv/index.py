"""The SQLite index: schema, pragmas, reads, and the statements the writer runs.

Workers only read (one connection each); every change goes through the writer
process, which calls the `write_*` functions inside its group-commit
transaction. Keys sort by bytes (BINARY collation), so listing a prefix is a
range scan on the primary key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import apsw

from mkv.keys import next_prefix

if TYPE_CHECKING:
    from mkv.freshness import RecordCache

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys(
    key TEXT PRIMARY KEY,
    state INT NOT NULL,
    volumes TEXT NOT NULL,
    size INT NOT NULL,
    md5 TEXT NOT NULL,
    mtime REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_pending ON keys(state) WHERE state >= 3;
CREATE TABLE IF NOT EXISTS volume_health(
    volume TEXT PRIMARY KEY,
    up INT NOT NULL,
    checked REAL NOT NULL,
    since REAL NOT NULL,
    latency_ms REAL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value TEXT);
"""


class State(enum.IntEnum):
    """Life of a record. Only LIVE is visible to GET, HEAD and ?list."""

    LIVE = 1
    UNLINKED = 2  # soft-deleted: blobs kept, listed by ?unlinked
    DELETING = 3  # hard delete recorded; blob removal on some volumes still pending


class SchemaError(RuntimeError):
    """The database file was made by an incompatible version of mkv."""


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


def connect(path: str, *, synchronous: str = "NORMAL", create: bool = False) -> apsw.Connection:
    """Open the index with the pragmas every process uses.

    WAL lets readers run while the writer commits; synchronous=NORMAL in WAL mode
    survives a crash of any process (only power loss can drop the last commits;
    FULL closes that too). mmap makes reads cheap.
    """
    flags = apsw.SQLITE_OPEN_READWRITE | (apsw.SQLITE_OPEN_CREATE if create else 0)
    conn = apsw.Connection(path, flags=flags)
    conn.set_busy_timeout(10_000)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA mmap_size=268435456")
    conn.execute("PRAGMA cache_size=-65536")
    return conn


def init_schema(conn: apsw.Connection) -> None:
    """Create the tables if missing and check the schema version."""
    with conn:
        conn.execute(SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise SchemaError(f"index schema version {row[0]}, this mkv needs {SCHEMA_VERSION}")


def open_index(path: str, *, synchronous: str = "NORMAL") -> apsw.Connection:
    """Open (creating if needed) an index ready for writing."""
    conn = connect(path, synchronous=synchronous, create=True)
    init_schema(conn)
    return conn


def _record(row: tuple) -> Record:
    key, state, volumes, size, md5, mtime = row
    return Record(key, State(state), tuple(volumes.split(",")) if volumes else (), size, md5, mtime)


_COLUMNS = "key, state, volumes, size, md5, mtime"


class Reader:
    """Read access to the index, for one thread or many.

    Given a connection, it is shared and guarded by a lock (apsw refuses
    concurrent use of one connection). Given a function that opens one, each
    thread gets its own: a gthread worker's threads then never queue behind a
    thread that holds the lock while it waits for the GIL.
    """

    def __init__(self, source: apsw.Connection | Callable[[], apsw.Connection],
                 cache: RecordCache | None = None) -> None:
        self.cache = cache
        if isinstance(source, apsw.Connection):
            self._shared: apsw.Connection | None = source
            self._lock: contextlib.AbstractContextManager = threading.Lock()
        else:
            self._shared = None
            self._open = source
            self._local = threading.local()
            self._lock = contextlib.nullcontext()

    @property
    def conn(self) -> apsw.Connection:
        if self._shared is not None:
            return self._shared
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._open()
        return conn

    def get(self, key: str) -> Record | None:
        """The key's record; through the cache when there is one (mkv.freshness)."""
        if self.cache is not None:
            return self.cache.get(key, self._read)
        return self._read(key)

    def _read(self, key: str) -> Record | None:
        with self._lock:
            row = self.conn.execute(f"SELECT {_COLUMNS} FROM keys WHERE key=?", (key,)).fetchone()
        return _record(row) if row else None

    def list_keys(self, prefix: str, start: str, limit: int, state: State) -> tuple[list[str], str]:
        """One page of keys under `prefix` from `start` (inclusive), and the next start or ""."""
        low = max(prefix, start)
        high = next_prefix(prefix)
        sql = "SELECT key FROM keys WHERE key >= ? AND state = ?"
        args: list = [low, int(state)]
        if high is not None:
            sql += " AND key < ?"
            args.append(high)
        sql += " ORDER BY key LIMIT ?"
        args.append(limit + 1)
        with self._lock:
            keys = [row[0] for row in self.conn.execute(sql, args)]
        if len(keys) > limit:
            return keys[:limit], keys[limit]
        return keys, ""

    def iter_keys(self, prefix: str, start: str, state: State, page: int = 1000) -> Iterator[str]:
        """Every key under `prefix`, fetched a page at a time so memory stays bounded."""
        while True:
            keys, start = self.list_keys(prefix, start, page, state)
            yield from keys
            if not start:
                return

    def health(self) -> dict[str, HealthRow]:
        with self._lock:
            rows = self.conn.execute(
                "SELECT volume, up, checked, since, latency_ms, error FROM volume_health"
            ).fetchall()
        return {r[0]: HealthRow(r[0], bool(r[1]), r[2], r[3], r[4], r[5]) for r in rows}

    def records_in_state(self, state: State, after: str = "", limit: int = 1000) -> list[Record]:
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {_COLUMNS} FROM keys WHERE state=? AND key>? ORDER BY key LIMIT ?",
                (int(state), after, limit),
            ).fetchall()
        return [_record(r) for r in rows]

    def scan(self, after: str = "", limit: int = 1000) -> list[Record]:
        """Records of every state in key order after `after`: the tools' walk."""
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {_COLUMNS} FROM keys WHERE key>? ORDER BY key LIMIT ?", (after, limit)
            ).fetchall()
        return [_record(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            return self.conn.execute("SELECT count(*) FROM keys").fetchone()[0]


# --- statements run by the writer inside its transaction -------------------------------


def write_record(conn: apsw.Connection, rec: Record) -> None:
    conn.execute(
        f"INSERT INTO keys({_COLUMNS}) VALUES(?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET "
        "state=excluded.state, volumes=excluded.volumes, size=excluded.size, "
        "md5=excluded.md5, mtime=excluded.mtime",
        (rec.key, int(rec.state), ",".join(rec.volumes), rec.size, rec.md5, rec.mtime),
    )


def write_records(conn: apsw.Connection, recs: Iterable[Record]) -> None:
    """Bulk insert for the tools: one prepared statement, many rows."""
    conn.executemany(
        f"INSERT INTO keys({_COLUMNS}) VALUES(?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET "
        "state=excluded.state, volumes=excluded.volumes, size=excluded.size, "
        "md5=excluded.md5, mtime=excluded.mtime",
        ((r.key, int(r.state), ",".join(r.volumes), r.size, r.md5, r.mtime) for r in recs),
    )


def read_record(conn: apsw.Connection, key: str) -> Record | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM keys WHERE key=?", (key,)).fetchone()
    return _record(row) if row else None


def write_state(conn: apsw.Connection, key: str, state: State) -> bool:
    conn.execute("UPDATE keys SET state=?, mtime=? WHERE key=?", (int(state), time.time(), key))
    return conn.changes() > 0


def write_delete(conn: apsw.Connection, key: str) -> bool:
    conn.execute("DELETE FROM keys WHERE key=?", (key,))
    return conn.changes() > 0


def write_health(conn: apsw.Connection, rows: Iterable[HealthRow]) -> None:
    with conn:
        conn.executemany(
            "INSERT OR REPLACE INTO volume_health VALUES(?,?,?,?,?,?)",
            ((r.volume, int(r.up), r.checked, r.since, r.latency_ms, r.error) for r in rows),
        )
