"""Index reads and writes against a real SQLite file (and :memory: where it fits)."""

import time

import apsw
import pytest

from mkv.index import schema
from mkv.index.reader import Reader
from mkv.model import HealthRow, Pending, PendingOp, PendingState, Record, State


def rec(key, state=State.LIVE, volumes=("a:1", "b:2"), size=3, md5="abc"):
    return Record(key, state, tuple(volumes), size, md5, 1.0)


@pytest.fixture
def conn():
    c = apsw.Connection(":memory:")
    schema.init_schema(c)
    return c


@pytest.fixture
def reader(conn):
    return Reader(conn)


def test_schema_version_recorded_and_checked(conn):
    version = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0]
    assert version == str(schema.SCHEMA_VERSION)
    conn.execute("UPDATE meta SET value='99' WHERE name='schema_version'")
    with pytest.raises(schema.SchemaError):
        schema.init_schema(conn)


def test_write_and_get_roundtrip(conn, reader):
    r = rec("/k ü")
    schema.write_record(conn, r)
    assert reader.get("/k ü") == r
    assert reader.get("/missing") is None
    schema.write_record(conn, rec("/k ü", volumes=("c:3",), size=9))
    assert reader.get("/k ü").volumes == ("c:3",)
    assert reader.get("/k ü").size == 9


def test_state_and_delete(conn, reader):
    schema.write_record(conn, rec("/a"))
    assert schema.write_state(conn, "/a", State.UNLINKED)
    assert reader.get("/a").state is State.UNLINKED
    assert not schema.write_state(conn, "/nope", State.UNLINKED)
    assert schema.write_delete(conn, "/a")
    assert reader.get("/a") is None
    assert not schema.write_delete(conn, "/a")


def test_list_is_a_prefix_range_with_paging(conn, reader):
    keys = ["/a", "/a/1", "/a/2", "/a/3", "/a0", "/ab", "/b", "/a/\U0010ffff", "/a/é"]
    schema.write_records(conn, [rec(k) for k in keys])
    schema.write_record(conn, rec("/a/gone", state=State.UNLINKED))
    all_a = sorted(k for k in keys if k.startswith("/a/"))
    seen, start = [], ""
    while True:
        page, start = reader.list_keys("/a/", start, 2, State.LIVE)
        seen += page
        if not start:
            break
    assert seen == all_a
    page, nxt = reader.list_keys("/a/", "", 2, State.LIVE)
    assert page == all_a[:2] and nxt == all_a[2]
    page, nxt = reader.list_keys("/a/", nxt, 2, State.LIVE)
    assert page == all_a[2:4] and nxt == all_a[4]
    page, nxt = reader.list_keys("/a/", nxt, 10, State.LIVE)
    assert page == all_a[4:] and nxt == ""
    assert reader.list_keys("/a/", "", 10, State.UNLINKED) == (["/a/gone"], "")
    assert reader.list_keys("/", "", 100, State.LIVE)[0] == sorted(keys)


def test_list_uses_the_primary_key_range_not_a_scan(conn):
    plan = conn.execute(
        "EXPLAIN QUERY PLAN SELECT key FROM keys WHERE key >= ? AND state = ? AND key < ? "
        "ORDER BY key LIMIT ?", ("/a", 1, "/b", 10)).fetchall()
    assert "SEARCH keys USING PRIMARY KEY" in plan[0][-1]


def test_health_rows(conn, reader):
    schema.write_health(conn, [HealthRow("a:1", True, 5.0, 1.0, 2.5, None),
                              HealthRow("b:2", False, 5.0, 4.0, None, "refused")])
    h = reader.health()
    assert h["a:1"].up and h["a:1"].latency_ms == 2.5
    assert not h["b:2"].up and h["b:2"].error == "refused"


def test_file_index_uses_wal(tmp_path):
    c = schema.open_index(str(tmp_path / "i.db"))
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


# --- counts kept by triggers (key_stats, pending_stats) ------------------------------------------


def counted(conn) -> dict[State, tuple[int, int]]:
    """What the stats tables should say, counted the slow way."""
    out = {s: (0, 0) for s in State}
    for state, n, size in conn.execute("SELECT state, count(*), sum(size) FROM keys GROUP BY state"):
        out[State(state)] = (n, size)
    return out


def pending_counted(conn) -> dict:
    out = {(op, st): 0 for op in PendingOp for st in PendingState}
    for op, st, n in conn.execute("SELECT op, state, count(*) FROM pending GROUP BY op, state"):
        out[PendingOp(op), PendingState(st)] = n
    return out


def test_a_new_index_counts_nothing(conn, reader):
    assert reader.key_stats() == {State.LIVE: (0, 0), State.UNLINKED: (0, 0),
                                  State.DELETING: (0, 0)}
    assert set(reader.pending_stats().values()) == {0}
    assert len(reader.pending_stats()) == len(PendingOp) * len(PendingState)


def test_key_stats_follow_every_change_of_keys(conn, reader):
    schema.write_record(conn, rec("/a", size=10))
    schema.write_record(conn, rec("/b", size=5))
    assert reader.key_stats()[State.LIVE] == (2, 15)
    schema.write_record(conn, rec("/a", size=7))  # overwritten in place: the new size
    assert reader.key_stats()[State.LIVE] == (2, 12)
    assert schema.write_state(conn, "/b", State.UNLINKED)
    assert reader.key_stats()[State.LIVE] == (1, 7)
    assert reader.key_stats()[State.UNLINKED] == (1, 5)
    schema.write_record(conn, rec("/b", state=State.DELETING, size=5))  # state and all by upsert
    assert reader.key_stats()[State.UNLINKED] == (0, 0)
    assert reader.key_stats()[State.DELETING] == (1, 5)
    schema.write_record(conn, rec("/a", size=7))  # the same row again: nothing moves
    assert reader.key_stats()[State.LIVE] == (1, 7)
    assert schema.write_delete(conn, "/b")
    assert not schema.write_delete(conn, "/b")
    assert reader.key_stats() == counted(conn) == {State.LIVE: (1, 7), State.UNLINKED: (0, 0),
                                                   State.DELETING: (0, 0)}


def test_key_stats_count_a_bulk_load_and_a_rolled_back_one_not(conn, reader):
    schema.write_records(conn, [rec(f"/bulk/{i}", size=i) for i in range(1000)])
    assert reader.key_stats()[State.LIVE] == (1000, sum(range(1000)))
    with pytest.raises(apsw.ConstraintError), conn:
        schema.write_records(conn, [rec("/bulk/x", size=1), rec("/bulk/y", size=None)])
    assert reader.key_stats() == counted(conn)
    assert reader.key_stats()[State.LIVE] == (1000, sum(range(1000)))


def test_pending_stats_follow_inserts_replacements_and_deletes(conn, reader):
    R, M = PendingOp.REMOVE, PendingOp.MARK_UNLINKED
    intent = [Pending("/p", v, R, PendingState.INTENT, 1.0, "g1") for v in ("a:1", "b:2", "c:3")]
    schema.write_pending(conn, intent)
    schema.write_pending(conn, [Pending("/p", "a:1", M, PendingState.DUE, 1.0, "g0")])
    stats = reader.pending_stats()
    assert stats[R, PendingState.INTENT] == 3 and stats[M, PendingState.DUE] == 1
    # the same row written again (a newer intent takes over): still one row
    schema.write_pending(conn, [Pending("/p", "a:1", R, PendingState.DUE, 2.0, "g1")])
    stats = reader.pending_stats()
    assert stats[R, PendingState.INTENT] == 2 and stats[R, PendingState.DUE] == 1
    schema.activate_intents(conn, "/p", "g1", 3.0)
    assert reader.pending_stats()[R, PendingState.DUE] == 3
    schema.orphan_intents(conn, 4.0)  # nothing left to orphan
    schema.delete_pending(conn, "/p", "g1", ["a:1", "b:2"], R)
    assert reader.pending_stats() == pending_counted(conn)
    assert reader.pending_stats()[R, PendingState.DUE] == 1
    assert sum(reader.pending_stats().values()) == 2


V3 = """
CREATE TABLE keys(key TEXT PRIMARY KEY, state INT NOT NULL, volumes TEXT NOT NULL,
                  size INT NOT NULL, md5 TEXT NOT NULL, mtime REAL NOT NULL,
                  gen TEXT NOT NULL DEFAULT '') WITHOUT ROWID;
CREATE INDEX keys_pending ON keys(state) WHERE state >= 3;
CREATE TABLE volume_health(volume TEXT PRIMARY KEY, up INT NOT NULL, checked REAL NOT NULL,
                           since REAL NOT NULL, latency_ms REAL, error TEXT);
CREATE TABLE meta(name TEXT PRIMARY KEY, value TEXT);
CREATE TABLE pending(key TEXT NOT NULL, gen TEXT NOT NULL, volume TEXT NOT NULL,
                     op INT NOT NULL, state INT NOT NULL, since REAL NOT NULL,
                     PRIMARY KEY(key, gen, volume, op)) WITHOUT ROWID;
CREATE INDEX pending_due ON pending(state, since);
INSERT INTO meta VALUES('schema_version', '3');
INSERT INTO keys VALUES('/l1', 1, 'a:1', 100, 'm', 1.0, 'g');
INSERT INTO keys VALUES('/l2', 1, 'a:1', 20, 'm', 1.0, 'g');
INSERT INTO keys VALUES('/u', 2, 'a:1', 3, 'm', 1.0, '');
INSERT INTO keys VALUES('/d', 3, 'a:1', 4000, 'm', 1.0, 'g');
INSERT INTO pending VALUES('/d', 'g', 'b:2', 1, 1, 5.0);
INSERT INTO pending VALUES('/x', 'g', 'b:2', 1, 0, 5.0);
"""


def test_a_version_3_index_is_counted_once_when_upgraded(tmp_path):
    db = str(tmp_path / "v3.db")
    old = schema.connect(db, create=True)
    old.execute(V3)
    old.close()
    conn = schema.open_index(db)
    reader = Reader(conn)
    assert conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0] == "5"
    assert reader.key_stats() == {State.LIVE: (2, 120), State.UNLINKED: (1, 3),
                                  State.DELETING: (1, 4000)}
    stats = reader.pending_stats()
    assert stats[PendingOp.REMOVE, PendingState.DUE] == 1
    assert stats[PendingOp.REMOVE, PendingState.INTENT] == 1
    assert sum(stats.values()) == 2
    # kept by the triggers from now on, and not counted again when opened again
    schema.write_delete(conn, "/d")
    conn.execute("UPDATE key_stats SET count = count + 1000 WHERE state = 2")  # a marker
    conn.close()
    conn = schema.open_index(db)
    assert Reader(conn).key_stats() == {State.LIVE: (2, 120), State.UNLINKED: (1001, 3),
                                        State.DELETING: (0, 0)}
    assert schema.SCHEMA_VERSION == 5 and 3 in schema.UPGRADES_FROM


def test_a_version_4_index_gets_identities_and_the_repair_queue_in_place(tmp_path):
    db = str(tmp_path / "v4.db")
    old = schema.connect(db, create=True)
    old.execute(V3.replace("'schema_version', '3'", "'schema_version', '4'"))
    old.execute("INSERT INTO volume_health VALUES('a:1', 1, 5.0, 1.0, 0.5, NULL)")
    old.close()
    conn = schema.open_index(db)
    reader = Reader(conn)
    assert conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0] == "5"
    row = reader.health()["a:1"]
    assert row.up and not row.replaced and row.latency_ms == 0.5  # the old row, kept
    assert reader.volume_ids() == {} and reader.repair_stats() == (0, 0)
    # the live and unlinked keys on a:1 are queued, the delete is not (it needs no copy)
    with conn:
        assert schema.queue_volume(conn, "a:1", "replaced") == 3
        assert schema.queue_volume(conn, "a:1", "replaced") == 0  # queued once
        assert schema.queue_volume(conn, "a:11", "replaced") == 0  # not a prefix match
    assert sorted(reader.repair_due(time.time(), 10)) == ["/l1", "/l2", "/u"]
    assert reader.repair_left("a:1") == 3


def test_repair_queue_rows_go_only_when_done_and_wait_after_a_failure(conn):
    reader = Reader(conn)
    with conn:
        schema.queue_repair(conn, [("/k", "a:1"), ("/k", "b:2"), ("/j", "")], "scrub")
        schema.repair_failed(conn, "/j", "no source", retry_after=60)
    now = time.time()
    assert reader.repair_due(now, 10) == ["/k"]  # /j waits for its retry
    assert sorted(reader.repair_due(now + 61, 10)) == ["/j", "/k"]
    assert reader.repair_stats() == (3, 1)
    with conn:
        schema.repair_done(conn, "/k")  # every row of the key
    assert reader.repair_stats() == (1, 1) and reader.repair_left("a:1") == 0
    with conn:
        schema.write_volume_id(conn, "a:1", "id1", "")
        schema.write_volume_id(conn, "a:1", "id1", "id2")
    assert reader.volume_ids() == {"a:1": ("id1", "id2")}
