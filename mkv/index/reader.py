"""Reading the index: one key, a page of a prefix, the published volume health, the
counts kept for /-/metrics, the tools' walk. Each gunicorn worker holds one Reader
(one connection per thread)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable

import apsw

from mkv.index import schema
from mkv.index.cache import RecordCache
from mkv.index.schema import COLUMNS, row_to_record
from mkv.keys import next_prefix
from mkv.model import HealthRow, Pending, PendingOp, PendingState, Record, State


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
        """The key's record; through the cache when there is one (mkv.index.cache)."""
        if self.cache is not None:
            return self.cache.get(key, self._read)
        return self._read(key)

    def _read(self, key: str) -> Record | None:
        with self._lock:
            row = self.conn.execute(f"SELECT {COLUMNS} FROM keys WHERE key=?", (key,)).fetchone()
        return row_to_record(row) if row else None

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

    def health(self) -> dict[str, HealthRow]:
        with self._lock:
            rows = self.conn.execute(
                "SELECT volume, up, checked, since, latency_ms, error, replaced FROM volume_health"
            ).fetchall()
        return {r[0]: HealthRow(r[0], bool(r[1]), r[2], r[3], r[4], r[5], bool(r[6])) for r in rows}

    def volume_ids(self) -> dict[str, tuple[str, str]]:
        with self._lock:
            return schema.read_volume_ids(self.conn)

    def repair_due(self, now: float, limit: int) -> list[str]:
        with self._lock:
            return schema.read_repair_due(self.conn, now, limit)

    def repair_stats(self) -> tuple[int, int]:
        with self._lock:
            return schema.read_repair_stats(self.conn)

    def repair_left(self, volume: str) -> int:
        with self._lock:
            return schema.repair_left(self.conn, volume)

    def key_stats(self) -> dict[State, tuple[int, int]]:
        """(keys, bytes) by state: the counts the index's triggers keep, for /-/metrics."""
        with self._lock:
            return schema.read_key_stats(self.conn)

    def pending_stats(self) -> dict[tuple[PendingOp, PendingState], int]:
        """Pending operations by (op, state), kept the same way."""
        with self._lock:
            return schema.read_pending_stats(self.conn)

    def records_in_state(self, state: State, after: str = "", limit: int = 1000) -> list[Record]:
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {COLUMNS} FROM keys WHERE state=? AND key>? ORDER BY key LIMIT ?",
                (int(state), after, limit),
            ).fetchall()
        return [row_to_record(r) for r in rows]

    def pending(self, key: str) -> list[Pending]:
        with self._lock:
            return schema.read_pending(self.conn, key)

    def due_pending(self, orphaned_before: float, volumes: Iterable[str],
                    limit: int = 1000) -> list[Pending]:
        """Pending operations to carry out now on `volumes` (those that answer): the due
        ones, and intents orphaned by a writer restart before `orphaned_before`, oldest
        first. Rows on other volumes wait without holding these back."""
        vols = list(volumes)
        if not vols:
            return []
        marks = ",".join("?" * len(vols))
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {schema.PENDING_COLUMNS} FROM pending WHERE volume IN ({marks}) "
                "AND (state=? OR (state=? AND since<?)) ORDER BY since LIMIT ?",
                (*vols, int(PendingState.DUE), int(PendingState.ORPHANED), orphaned_before, limit),
            ).fetchall()
        return [schema.row_to_pending(r) for r in rows]

    def scan(self, after: str = "", limit: int = 1000) -> list[Record]:
        """Records of every state in key order after `after`: the tools' walk."""
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {COLUMNS} FROM keys WHERE key>? ORDER BY key LIMIT ?", (after, limit)
            ).fetchall()
        return [row_to_record(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            return self.conn.execute("SELECT count(*) FROM keys").fetchone()[0]
