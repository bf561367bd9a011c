"""The SQLite index file: schema, pragmas, and the statements the writer runs.

Workers only read (mkv.index.reader); every change goes through the writer process,
which calls the `write_*` functions inside its group-commit transaction. Keys sort by
bytes (BINARY collation), so listing a prefix is a range scan on the primary key.
docs/design.md, "Index", has the schema's reasons.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import apsw

from mkv.model import HealthRow, Pending, PendingOp, PendingState, Record, State

SCHEMA_VERSION = 5
#: Versions this mkv opens and upgrades in place: 2 added the pending table, 3 the
#: generation columns (of keys and of pending), 4 the counts kept by triggers
#: (key_stats, pending_stats), 5 volume identity and the repair queue (volume_ids,
#: repair, volume_health.replaced: docs/design.md, "Self-healing").
UPGRADES_FROM = {1, 2, 3, 4}


SCHEMA = """
CREATE TABLE IF NOT EXISTS keys(
    key TEXT PRIMARY KEY,
    state INT NOT NULL,
    volumes TEXT NOT NULL,
    size INT NOT NULL,
    md5 TEXT NOT NULL,
    mtime REAL NOT NULL,
    gen TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_pending ON keys(state) WHERE state >= 3;
CREATE TABLE IF NOT EXISTS volume_health(
    volume TEXT PRIMARY KEY,
    up INT NOT NULL,
    checked REAL NOT NULL,
    since REAL NOT NULL,
    latency_ms REAL,
    error TEXT,
    replaced INT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS pending(
    key TEXT NOT NULL,
    gen TEXT NOT NULL,
    volume TEXT NOT NULL,
    op INT NOT NULL,
    state INT NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY(key, gen, volume, op)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_due ON pending(state, since);
CREATE TABLE IF NOT EXISTS volume_ids(
    volume TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    found TEXT NOT NULL DEFAULT '',
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS repair(
    key TEXT NOT NULL,
    volume TEXT NOT NULL,
    reason TEXT NOT NULL,
    since REAL NOT NULL,
    attempts INT NOT NULL DEFAULT 0,
    due REAL NOT NULL DEFAULT 0,
    error TEXT,
    PRIMARY KEY(key, volume)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS repair_due ON repair(due);
CREATE INDEX IF NOT EXISTS repair_volume ON repair(volume);
"""

#: Counts that /-/metrics reads instead of counting rows: kept by triggers, so every
#: writer of `keys` and `pending` keeps them (the writer, a rebuild's bulk load, an
#: operator's sqlite3), in the same transaction as the change. One row per state (per
#: op and state) exists from the start, so a trigger only ever UPDATEs a row.
#: docs/design.md, "Index".
STATS = """
CREATE TABLE IF NOT EXISTS key_stats(
    state INT PRIMARY KEY,
    count INT NOT NULL DEFAULT 0,
    bytes INT NOT NULL DEFAULT 0
);
CREATE TRIGGER IF NOT EXISTS key_stats_insert AFTER INSERT ON keys BEGIN
    UPDATE key_stats SET count = count + 1, bytes = bytes + NEW.size WHERE state = NEW.state;
END;
CREATE TRIGGER IF NOT EXISTS key_stats_delete AFTER DELETE ON keys BEGIN
    UPDATE key_stats SET count = count - 1, bytes = bytes - OLD.size WHERE state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS key_stats_update AFTER UPDATE OF state, size ON keys
WHEN OLD.state IS NOT NEW.state OR OLD.size IS NOT NEW.size BEGIN
    UPDATE key_stats SET count = count - 1, bytes = bytes - OLD.size WHERE state = OLD.state;
    UPDATE key_stats SET count = count + 1, bytes = bytes + NEW.size WHERE state = NEW.state;
END;
CREATE TABLE IF NOT EXISTS pending_stats(
    op INT NOT NULL,
    state INT NOT NULL,
    count INT NOT NULL DEFAULT 0,
    PRIMARY KEY(op, state)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS pending_stats_insert AFTER INSERT ON pending BEGIN
    UPDATE pending_stats SET count = count + 1 WHERE op = NEW.op AND state = NEW.state;
END;
CREATE TRIGGER IF NOT EXISTS pending_stats_delete AFTER DELETE ON pending BEGIN
    UPDATE pending_stats SET count = count - 1 WHERE op = OLD.op AND state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS pending_stats_update AFTER UPDATE OF op, state ON pending
WHEN OLD.op IS NOT NEW.op OR OLD.state IS NOT NEW.state BEGIN
    UPDATE pending_stats SET count = count - 1 WHERE op = OLD.op AND state = OLD.state;
    UPDATE pending_stats SET count = count + 1 WHERE op = NEW.op AND state = NEW.state;
END;
"""


class SchemaError(RuntimeError):
    """The database file was made by an incompatible version of mkv."""


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


def _columns(conn: apsw.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _has_table(conn: apsw.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                        (name,)).fetchone() is not None


def _count_once(conn: apsw.Connection) -> None:
    """Create the stats tables and their triggers, filled from the rows there are now
    (inside init_schema's transaction, so no change slips between count and trigger)."""
    conn.execute(STATS)
    conn.execute("DELETE FROM key_stats")
    conn.executemany("INSERT INTO key_stats(state) VALUES(?)", ((int(s),) for s in State))
    conn.execute("UPDATE key_stats SET count = (SELECT count(*) FROM keys k WHERE k.state = "
                 "key_stats.state), bytes = (SELECT coalesce(sum(size), 0) FROM keys k "
                 "WHERE k.state = key_stats.state)")
    conn.execute("DELETE FROM pending_stats")
    conn.executemany("INSERT INTO pending_stats(op, state) VALUES(?, ?)",
                     ((int(op), int(st)) for op in PendingOp for st in PendingState))
    conn.execute("UPDATE pending_stats SET count = (SELECT count(*) FROM pending p WHERE "
                 "p.op = pending_stats.op AND p.state = pending_stats.state)")


def init_schema(conn: apsw.Connection) -> None:
    """Create the tables if missing, check the schema version, and upgrade an older
    file in place (by what its tables lack, so a half-upgraded file is finished too)."""
    with conn:
        counted = _has_table(conn, "key_stats")
        conn.execute(SCHEMA)  # an older file gets the tables it lacked
        row = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        if row is not None and int(row[0]) != SCHEMA_VERSION and int(row[0]) not in UPGRADES_FROM:
            raise SchemaError(f"index schema version {row[0]}, this mkv needs {SCHEMA_VERSION}")
        if "gen" not in _columns(conn, "keys"):
            conn.execute("ALTER TABLE keys ADD COLUMN gen TEXT NOT NULL DEFAULT ''")
        if "gen" not in _columns(conn, "pending"):  # version 2: its rows name legacy files
            conn.execute("DROP INDEX IF EXISTS pending_due")  # made again for the new table
            conn.execute("ALTER TABLE pending RENAME TO pending_v2")
            conn.execute(SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS pending"):])
            conn.execute("INSERT INTO pending(key, gen, volume, op, state, since) "
                         "SELECT key, '', volume, op, state, since FROM pending_v2")
            conn.execute("DROP TABLE pending_v2")
        if "replaced" not in _columns(conn, "volume_health"):  # before version 5
            conn.execute("ALTER TABLE volume_health ADD COLUMN replaced INT NOT NULL DEFAULT 0")
        if not counted:  # a new file, or one before version 4: counted once, kept from now on
            _count_once(conn)
        conn.execute("INSERT OR REPLACE INTO meta VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))


def open_index(path: str, *, synchronous: str = "NORMAL") -> apsw.Connection:
    """Open (creating if needed) an index ready for writing."""
    conn = connect(path, synchronous=synchronous, create=True)
    init_schema(conn)
    return conn


def row_to_record(row: tuple) -> Record:
    key, state, volumes, size, md5, mtime, gen = row
    return Record(key, State(state), tuple(volumes.split(",")) if volumes else (), size, md5,
                  mtime, gen)


COLUMNS = "key, state, volumes, size, md5, mtime, gen"


_UPSERT = (f"INSERT INTO keys({COLUMNS}) VALUES(?,?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET "
           "state=excluded.state, volumes=excluded.volumes, size=excluded.size, "
           "md5=excluded.md5, mtime=excluded.mtime, gen=excluded.gen")


def _row(rec: Record) -> tuple:
    return (rec.key, int(rec.state), ",".join(rec.volumes), rec.size, rec.md5, rec.mtime, rec.gen)


def write_record(conn: apsw.Connection, rec: Record) -> None:
    conn.execute(_UPSERT, _row(rec))


def write_records(conn: apsw.Connection, recs: Iterable[Record]) -> None:
    """Bulk insert for the tools: one prepared statement, many rows."""
    conn.executemany(_UPSERT, (_row(r) for r in recs))


def read_record(conn: apsw.Connection, key: str) -> Record | None:
    row = conn.execute(f"SELECT {COLUMNS} FROM keys WHERE key=?", (key,)).fetchone()
    return row_to_record(row) if row else None


def write_state(conn: apsw.Connection, key: str, state: State) -> bool:
    conn.execute("UPDATE keys SET state=?, mtime=? WHERE key=?", (int(state), time.time(), key))
    return conn.changes() > 0


def write_delete(conn: apsw.Connection, key: str) -> bool:
    conn.execute("DELETE FROM keys WHERE key=?", (key,))
    return conn.changes() > 0


def read_key_stats(conn: apsw.Connection) -> dict[State, tuple[int, int]]:
    """Keys and bytes by state, as the triggers keep them (no count over `keys`)."""
    return {State(state): (count, size) for state, count, size in
            conn.execute("SELECT state, count, bytes FROM key_stats")}


def read_pending_stats(conn: apsw.Connection) -> dict[tuple[PendingOp, PendingState], int]:
    """Pending operations by op and state, as the triggers keep them."""
    return {(PendingOp(op), PendingState(state)): count for op, state, count in
            conn.execute("SELECT op, state, count FROM pending_stats")}


def write_health(conn: apsw.Connection, rows: Iterable[HealthRow]) -> None:
    with conn:
        conn.executemany(
            "INSERT OR REPLACE INTO volume_health(volume, up, checked, since, latency_ms, error, "
            "replaced) VALUES(?,?,?,?,?,?,?)",
            ((r.volume, int(r.up), r.checked, r.since, r.latency_ms, r.error, int(r.replaced))
             for r in rows),
        )


# --- pending operations (docs/design.md, "Pending operations") --------------------------


PENDING_COLUMNS = "key, volume, op, state, since, gen"


def row_to_pending(row: tuple) -> Pending:
    key, volume, op, state, since, gen = row
    return Pending(key, volume, PendingOp(op), PendingState(state), since, gen)


def read_pending(conn: apsw.Connection, key: str) -> list[Pending]:
    return [row_to_pending(r) for r in conn.execute(
        f"SELECT {PENDING_COLUMNS} FROM pending WHERE key=?", (key,))]


def write_pending(conn: apsw.Connection, rows: Iterable[Pending]) -> None:
    """Insert or update: a new intent or due operation takes over an older row. An
    upsert, not INSERT OR REPLACE: the row REPLACE deletes fires no delete trigger, and
    pending_stats would count it twice."""
    conn.executemany(
        f"INSERT INTO pending({PENDING_COLUMNS}) VALUES(?,?,?,?,?,?) "
        "ON CONFLICT(key, gen, volume, op) DO UPDATE SET state=excluded.state, since=excluded.since",
        ((p.key, p.volume, int(p.op), int(p.state), p.since, p.gen) for p in rows))


def delete_pending(conn: apsw.Connection, key: str, gen: str, volumes: Iterable[str],
                   op: PendingOp) -> None:
    conn.executemany("DELETE FROM pending WHERE key=? AND gen=? AND volume=? AND op=?",
                     ((key, gen, v, int(op)) for v in volumes))


def activate_intents(conn: apsw.Connection, key: str, gen: str, since: float) -> None:
    """The write `gen` of `key` ended without naming these copies: their removal is due."""
    conn.execute("UPDATE pending SET state=?, since=? WHERE key=? AND gen=? AND state IN (?, ?)",
                 (int(PendingState.DUE), since, key, gen, int(PendingState.INTENT),
                  int(PendingState.ORPHANED)))


def orphan_intents(conn: apsw.Connection, since: float) -> None:
    """On a writer's start: intents of the writer before it have no owner any more."""
    with conn:
        conn.execute("UPDATE pending SET state=?, since=? WHERE state=?",
                     (int(PendingState.ORPHANED), since, int(PendingState.INTENT)))


# --- self-healing (docs/design.md, "Self-healing") --------------------------------------


def read_volume_ids(conn: apsw.Connection) -> dict[str, tuple[str, str]]:
    """volume -> (the id the index expects on its disk, the other id found there while
    it is replaced, '' if none)."""
    return {vol: (vid, found) for vol, vid, found in
            conn.execute("SELECT volume, id, found FROM volume_ids")}


def write_volume_id(conn: apsw.Connection, volume: str, vid: str, found: str) -> None:
    conn.execute("INSERT INTO volume_ids(volume, id, found, since) VALUES(?,?,?,?) "
                 "ON CONFLICT(volume) DO UPDATE SET id=excluded.id, found=excluded.found, "
                 "since=excluded.since", (volume, vid, found, time.time()))


def queue_volume(conn: apsw.Connection, volume: str, reason: str) -> int:
    """Queue every record naming `volume` (but deletes, which need no copy) for repair of
    its copy there. One statement over `keys`: a scan, once per replacement."""
    conn.execute("INSERT OR IGNORE INTO repair(key, volume, reason, since) "
                 "SELECT key, ?, ?, ? FROM keys WHERE state < 3 AND "
                 "instr(',' || volumes || ',', ',' || ? || ',') > 0",
                 (volume, reason, time.time(), volume))
    return conn.changes()


def queue_repair(conn: apsw.Connection, items: Iterable[tuple[str, str]], reason: str) -> None:
    """Queue (key, volume) pairs; volume '' when the bad copy's volume is not known."""
    now = time.time()
    conn.executemany("INSERT OR IGNORE INTO repair(key, volume, reason, since) VALUES(?,?,?,?)",
                     ((k, v, reason, now) for k, v in items))


def repair_done(conn: apsw.Connection, key: str) -> None:
    """Every queued row of the key: one repair makes all its copies whole."""
    conn.execute("DELETE FROM repair WHERE key=?", (key,))


def repair_failed(conn: apsw.Connection, key: str, error: str, retry_after: float) -> None:
    conn.execute("UPDATE repair SET attempts = attempts + 1, error=?, due=? WHERE key=?",
                 (error[:500], time.time() + retry_after, key))


def read_repair_due(conn: apsw.Connection, now: float, limit: int) -> list[str]:
    return [k for (k,) in conn.execute(
        "SELECT DISTINCT key FROM repair WHERE due <= ? ORDER BY due LIMIT ?", (now, limit))]


def read_repair_stats(conn: apsw.Connection) -> tuple[int, int]:
    """(queued rows, rows that failed at least once)."""
    n, failed = conn.execute("SELECT count(*), coalesce(sum(attempts > 0), 0) FROM repair").fetchone()
    return n, failed


def repair_left(conn: apsw.Connection, volume: str) -> int:
    return conn.execute("SELECT count(*) FROM repair WHERE volume=?", (volume,)).fetchone()[0]
