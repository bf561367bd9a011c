"""The writer process's protocol, group commit and lock rules, over a real unix socket."""

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mkv.index import schema
from mkv.index.reader import Reader
from mkv.model import Pending, PendingOp, PendingState, Record, State
from mkv.writer.client import WriterClient, wait_ready
from mkv.writer.protocol import KeyLocked, WriterError
from mkv.writer.server import serve_in_thread


def rec(key, volumes=("a:1",)):
    return Record(key, State.LIVE, tuple(volumes), 1, "m", 1.0)


@pytest.fixture
def writer(tmp_path):
    db, sock = str(tmp_path / "i.db"), str(tmp_path / "w.sock")
    server, thread = serve_in_thread(db, sock)
    yield db, sock, server
    server.stop()
    thread.join(5)


def reader_of(db):
    return Reader(schema.connect(db))


def test_lock_put_releases_and_is_durable(writer):
    db, sock, _ = writer
    c = WriterClient(sock)
    assert c.lock("/k") is None
    c.put(rec("/k"))
    assert reader_of(db).get("/k").volumes == ("a:1",)
    # the lock was released with the commit
    assert c.lock("/k").key == "/k"
    c.unlock("/k")


def test_second_locker_gets_locked(writer):
    _, sock, _ = writer
    a, b = WriterClient(sock), WriterClient(sock)
    a.lock("/k")
    with pytest.raises(KeyLocked):
        b.lock("/k")
    with pytest.raises(KeyLocked):
        a.lock("/k")  # not re-entrant either: one write per key at a time
    a.unlock("/k")
    b.lock("/k")


def test_write_without_lock_is_refused(writer):
    _, sock, _ = writer
    c = WriterClient(sock)
    with pytest.raises(WriterError) as e:
        c.put(rec("/k"))
    assert e.value.code == "not_locked"
    other = WriterClient(sock)
    other.lock("/k")
    with pytest.raises(KeyLocked):
        c.delete("/k")


def test_closed_connection_releases_locks(writer):
    _, sock, server = writer
    a = WriterClient(sock)
    a.lock("/x")
    a.lock("/y")
    a.close()
    b = WriterClient(sock)
    deadline = time.time() + 5
    while True:
        try:
            b.lock("/x")
            break
        except KeyLocked:
            assert time.time() < deadline
            time.sleep(0.01)
    b.lock("/y")


def test_release_gives_the_lock_back_and_never_raises(writer):
    _, sock, server = writer
    a, b = WriterClient(sock), WriterClient(sock)
    a.lock("/r")
    a.release("/r")
    b.lock("/r")  # free at once: given back on a connection that stays open
    assert a._sock is not None
    server.stop()  # the writer dies while b holds /r: release cannot tell it, and need not
    deadline = time.time() + 5
    while os.path.exists(sock):
        assert time.time() < deadline
        time.sleep(0.01)
    b.release("/r")
    assert b._sock is None


def test_compare_and_set(writer):
    db, sock, _ = writer
    c = WriterClient(sock)
    c.lock("/k")
    c.put(rec("/k", ("a:1",)))
    c.lock("/k")
    with pytest.raises(WriterError) as e:
        c.put(rec("/k", ("b:2",)), expect=rec("/k", ("z:9",)), keep_lock=True)
    assert e.value.code == "conflict"
    # the same volumes are not enough: the whole record must be the expected one
    other = dataclasses.replace(rec("/k", ("a:1",)), md5="another value")
    with pytest.raises(WriterError) as e:
        c.put(rec("/k", ("b:2",)), expect=other, keep_lock=True)
    assert e.value.code == "conflict"
    c.put(rec("/k", ("b:2",)), expect=rec("/k", ("a:1",)), keep_lock=True)
    assert reader_of(db).get("/k").volumes == ("b:2",)
    # the same compare-and-set again (a retry whose first answer was lost) is done already;
    # another record in its place is still a conflict
    c.put(rec("/k", ("b:2",)), expect=rec("/k", ("a:1",)), keep_lock=True)
    with pytest.raises(WriterError) as e:
        c.put(rec("/k", ("c:3",)), expect=rec("/k", ("a:1",)), keep_lock=True)
    assert e.value.code == "conflict"
    # a conditional delete: only exactly the expected record; already gone is done
    with pytest.raises(WriterError) as e:
        c.delete("/k", expect=rec("/k", ("a:1",)), keep_lock=True)
    assert e.value.code == "conflict"
    c.delete("/k", expect=rec("/k", ("b:2",)), keep_lock=True)
    assert reader_of(db).get("/k") is None
    c.delete("/k", expect=rec("/k", ("b:2",)))


def test_state_change_expecting_a_record(writer):
    db, sock, _ = writer
    c = WriterClient(sock)
    c.lock("/s")
    c.put(rec("/s"), keep_lock=True)
    with pytest.raises(WriterError) as e:  # someone else's record is there: not changed
        c.set_state("/s", State.DELETING, expect=rec("/s", ("z:9",)), keep_lock=True)
    assert e.value.code == "conflict"
    assert reader_of(db).get("/s").state is State.LIVE
    deleting = c.set_state("/s", State.DELETING, expect=rec("/s"), keep_lock=True)
    assert deleting.state is State.DELETING and deleting.volumes == ("a:1",)
    assert reader_of(db).get("/s") == deleting  # the answer is the record as written
    # a retry whose first answer was lost finds the change made: done, same record
    assert c.set_state("/s", State.DELETING, expect=rec("/s"), keep_lock=True) == deleting
    c.delete("/s", expect=deleting)
    assert reader_of(db).get("/s") is None


def test_state_keep_lock_and_delete(writer):
    db, sock, _ = writer
    c = WriterClient(sock)
    c.lock("/k")
    c.put(rec("/k"))
    c.lock("/k")
    c.set_state("/k", State.DELETING, keep_lock=True)
    with pytest.raises(KeyLocked):
        WriterClient(sock).lock("/k")
    c.delete("/k")
    assert reader_of(db).get("/k") is None


def test_bulk_insert(writer):
    db, sock, _ = writer
    c = WriterClient(sock)
    assert c.bulk([rec(f"/k{i}") for i in range(500)]) == 500
    assert reader_of(db).count() == 500


def test_bad_request_is_answered_not_fatal(writer):
    _, sock, _ = writer
    c = WriterClient(sock)
    with pytest.raises(WriterError) as e:
        c.call(op="nonsense")
    assert e.value.code == "bad_request"
    with pytest.raises(WriterError):
        c.call(op="put", key="/k")  # missing fields, not locked
    assert c.ping()["pid"] == os.getpid()


def test_group_commit_batches_concurrent_writers(writer):
    """32 threads writing at once share commits: fewer commits than writes."""
    db, sock, server = writer
    n_threads, per_thread = 32, 30

    def work(t):
        c = WriterClient(sock)
        for i in range(per_thread):
            key = f"/t{t}/{i}"
            c.lock(key)
            c.put(rec(key))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reader_of(db).count() == n_threads * per_thread
    assert server.committed_ops == n_threads * per_thread
    assert server.commits < server.committed_ops


def test_writer_process_refuses_a_second_writer_and_stops_on_sigterm(tmp_path):
    db, sock = str(tmp_path / "i.db"), str(tmp_path / "w.sock")
    cmd = [sys.executable, "-m", "mkv.writer", "--db", db, "--socket", sock]
    first = subprocess.Popen(cmd)
    try:
        wait_ready(sock)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        assert second.returncode == 1
        assert "another writer" in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=5) == 0
        assert not os.path.exists(sock)
    finally:
        first.kill()


def test_stale_socket_of_a_killed_writer_is_replaced(tmp_path):
    db, sock = str(tmp_path / "i.db"), str(tmp_path / "w.sock")
    cmd = [sys.executable, "-m", "mkv.writer", "--db", db, "--socket", sock]
    first = subprocess.Popen(cmd)
    wait_ready(sock)
    first.kill()
    first.wait()
    assert os.path.exists(sock)
    second = subprocess.Popen(cmd)
    try:
        wait_ready(sock)
        c = WriterClient(sock)
        c.lock("/k")
        c.put(rec("/k"))
    finally:
        second.terminate()
        second.wait(5)


# --- intents and pending operations ---------------------------------------------------------


def gen(record, g):
    return dataclasses.replace(record, gen=g)


def pending_of(db, key):
    return {(p.volume, p.op, p.state) for p in reader_of(db).pending(key)}


R, INT, D, ORPH = PendingOp.REMOVE, PendingState.INTENT, PendingState.DUE, PendingState.ORPHANED


def test_a_put_keeps_the_copies_it_names_and_queues_the_others(writer):
    db, sock, _ = writer
    c = WriterClient(sock)
    assert c.lock("/k", intend=["a:1", "b:2", "c:3"], gen="a1") is None
    assert pending_of(db, "/k") == {("a:1", R, INT), ("b:2", R, INT), ("c:3", R, INT)}
    c.intend("/k", "a1", ["d:4"])  # a replica re-placed after b:2 failed
    c.put(gen(rec("/k", ("a:1", "c:3", "d:4")), "a1"), new=True, intent=True)
    assert pending_of(db, "/k") == {("b:2", R, D)}
    assert [p.key for p in reader_of(db).due_pending(0.0, ["b:2"])] == ["/k"]
    assert reader_of(db).due_pending(0.0, ["a:1", "e:5"]) == []  # only rows on those volumes


def test_a_write_that_ends_without_a_record_queues_every_copy(writer):
    db, sock, _ = writer
    c = WriterClient(sock)
    c.lock("/gave-up", intend=["a:1", "b:2"], gen="a1")
    c.unlock("/gave-up")
    assert pending_of(db, "/gave-up") == {("a:1", R, D), ("b:2", R, D)}
    dying = WriterClient(sock)
    dying.lock("/died", intend=["a:1"], gen="a1")
    dying.close()  # the worker is gone: the kernel closes its socket
    deadline = time.monotonic() + 5
    while pending_of(db, "/died") != {("a:1", R, D)} and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pending_of(db, "/died") == {("a:1", R, D)}


def test_a_live_key_gets_no_intent(writer):
    db, sock, _ = writer
    c = WriterClient(sock)
    c.lock("/live")
    c.put(rec("/live"))
    assert c.lock("/live", intend=["a:1"], gen="a2") is not None
    c.unlock("/live")
    assert pending_of(db, "/live") == set()


def test_intents_survive_a_writer_restart_orphaned_and_a_made_due_one_refuses_the_record(tmp_path):
    db, sock = str(tmp_path / "i.db"), str(tmp_path / "w.sock")
    server, thread = serve_in_thread(db, sock)
    c, d = WriterClient(sock, retry_for=5), WriterClient(sock, retry_for=5)  # two workers
    c.lock("/slow", intend=["a:1"], gen="a1")
    d.lock("/late", intend=["a:1"], gen="a1")
    server.stop()
    thread.join(5)  # the writer dies with both uploads still going on
    server, thread = serve_in_thread(db, sock)
    try:
        assert pending_of(db, "/slow") == {("a:1", R, ORPH)}
        c.put(gen(rec("/slow"), "a1"), new=True, intent=True, retry=True)  # still its own: recorded
        assert reader_of(db).get("/slow") is not None and pending_of(db, "/slow") == set()
        h = WriterClient(sock)  # the health process made /late's copy due meanwhile
        h.lock("/late")
        h.pending_done(Pending("/late", "a:1", R, D, 0.0, "a1"))
        with pytest.raises(WriterError) as err:
            d.put(gen(rec("/late"), "a1"), new=True, intent=True, retry=True)
        assert err.value.code == "conflict" and reader_of(db).get("/late") is None
    finally:
        server.stop()
        thread.join(5)


def test_unlink_marks_queue_per_volume(writer):
    db, sock, _ = writer
    c = WriterClient(sock)
    c.lock("/u")
    c.put(rec("/u", ("a:1", "b:2")))
    current = c.lock("/u")
    c.set_state("/u", State.UNLINKED, expect=current, mark=["b:2"])
    assert pending_of(db, "/u") == {("b:2", PendingOp.MARK_UNLINKED, D)}


def test_an_index_of_the_previous_schema_is_upgraded_in_place(tmp_path):
    db = str(tmp_path / "old.db")
    conn = schema.connect(db, create=True)
    conn.execute("""
        CREATE TABLE keys(key TEXT PRIMARY KEY, state INT NOT NULL, volumes TEXT NOT NULL,
                          size INT NOT NULL, md5 TEXT NOT NULL, mtime REAL NOT NULL) WITHOUT ROWID;
        CREATE TABLE meta(name TEXT PRIMARY KEY, value TEXT);
        INSERT INTO meta VALUES('schema_version', '1');
        INSERT INTO keys VALUES('/old', 1, 'a:1', 1, 'm', 1.0);""")
    conn.close()
    upgraded = schema.open_index(db)
    assert schema.read_record(upgraded, "/old") == rec("/old")  # gen "": the legacy file names
    assert schema.read_pending(upgraded, "/old") == []
    version = upgraded.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0]
    assert version == str(schema.SCHEMA_VERSION)


def test_an_index_with_pending_rows_but_no_generations_is_upgraded_in_place(tmp_path):
    db = str(tmp_path / "v2.db")
    conn = schema.connect(db, create=True)
    conn.execute("""
        CREATE TABLE keys(key TEXT PRIMARY KEY, state INT NOT NULL, volumes TEXT NOT NULL,
                          size INT NOT NULL, md5 TEXT NOT NULL, mtime REAL NOT NULL) WITHOUT ROWID;
        CREATE TABLE meta(name TEXT PRIMARY KEY, value TEXT);
        CREATE TABLE pending(key TEXT NOT NULL, volume TEXT NOT NULL, op INT NOT NULL,
                             state INT NOT NULL, since REAL NOT NULL,
                             PRIMARY KEY(key, volume, op)) WITHOUT ROWID;
        CREATE INDEX pending_due ON pending(state, since);
        INSERT INTO meta VALUES('schema_version', '2');
        INSERT INTO pending VALUES('/p', 'a:1', 1, 1, 5.0);""")
    conn.close()
    upgraded = schema.open_index(db)
    assert schema.read_pending(upgraded, "/p") == [Pending("/p", "a:1", R, D, 5.0, "")]
    assert upgraded.execute("SELECT name FROM sqlite_master WHERE name='pending_due'").fetchone()
    schema.open_index(db).close()  # opening it again changes nothing


@pytest.mark.parametrize("state", [State.UNLINKED, State.DELETING])
def test_a_put_over_an_unlinked_or_deleting_record_queues_its_other_copies(writer, state):
    db, sock, _ = writer
    c = WriterClient(sock)
    c.lock("/re")
    c.put(dataclasses.replace(rec("/re", ("a:1", "b:2")), state=state, gen="a1"))
    assert c.lock("/re", intend=["b:2", "c:3"], gen="a2").state is state
    c.put(gen(rec("/re", ("b:2", "c:3")), "a2"), new=True, intent=True)
    # the old write's files on every volume: another generation, other file names
    assert pending_of(db, "/re") == {("a:1", R, D), ("b:2", R, D)}


def test_a_generation_that_is_not_a_file_name_is_refused(writer):
    _, sock, _ = writer
    c = WriterClient(sock)
    for bad in ("../x", "G1", "a" * 33, "1/2"):
        with pytest.raises(WriterError) as err:
            c.lock(f"/bad/{bad}", intend=["a:1"], gen=bad)
        assert err.value.code == "bad_request"
        c.lock("/bad/put")
        with pytest.raises(WriterError):
            c.put(gen(rec("/bad/put"), bad))
        c.unlock("/bad/put")
