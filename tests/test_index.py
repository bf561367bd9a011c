"""Index reads and writes against a real SQLite file (and :memory: where it fits)."""

import apsw
import pytest

from mkv.index import schema
from mkv.index.reader import Reader
from mkv.model import HealthRow, Record, State


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
    assert list(reader.iter_keys("/a/", "", State.LIVE, page=2)) == all_a
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
