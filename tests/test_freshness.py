"""The workers' record cache: never an answer older than a write a client was told of."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from mkv.index.cache import ChangeCount, RecordCache
from mkv.model import Record, State
from mkv.writer.client import WriterClient, wait_ready
from tests.helpers import replaced, wait_until


def rec(key: str, md5: str = "m") -> Record:
    return Record(key, State.LIVE, ("a:1",), 1, md5, 1.0)


class Loads:
    """An index stand-in that counts reads; its answers are changed by the test."""

    def __init__(self) -> None:
        self.answers: dict[str, Record | None] = {}
        self.reads = 0
        self.during: object = None

    def __call__(self, key: str) -> Record | None:
        self.reads += 1
        if callable(self.during):
            self.during()
        return self.answers.get(key)


def test_a_record_is_read_once_until_anything_is_committed():
    count = ChangeCount.create()
    cache, index = RecordCache(count), Loads()
    index.answers["/k"] = rec("/k", "old")
    assert cache.get("/k", index) == rec("/k", "old")
    assert cache.get("/k", index) == rec("/k", "old")
    assert index.reads == 1
    index.answers["/k"] = rec("/k", "new")
    count.bump()
    assert cache.get("/k", index) == rec("/k", "new")
    assert index.reads == 2


def test_a_miss_is_kept_too_and_dropped_by_a_commit():
    count = ChangeCount.create()
    cache, index = RecordCache(count), Loads()
    assert cache.get("/k", index) is None
    assert cache.get("/k", index) is None
    assert index.reads == 1
    index.answers["/k"] = rec("/k")
    count.bump()
    assert cache.get("/k", index) == rec("/k")


def test_a_record_read_while_a_commit_lands_is_not_served_after_it():
    """The count is read before the index: a read that straddles a commit keeps the
    count from before it, so the next lookup reads again."""
    count = ChangeCount.create()
    cache, index = RecordCache(count), Loads()
    index.answers["/k"] = rec("/k", "old")
    index.during = count.bump  # the writer commits (and counts) while the read runs
    assert cache.get("/k", index) == rec("/k", "old")
    index.during = None
    index.answers["/k"] = rec("/k", "new")
    assert cache.get("/k", index) == rec("/k", "new")
    assert index.reads == 2


def test_a_full_cache_starts_over():
    count = ChangeCount.create()
    cache, index = RecordCache(count, size=3), Loads()
    for i in range(3):
        cache.get(f"/k{i}", index)
    cache.get("/k3", index)
    assert index.reads == 4
    cache.get("/k3", index)
    cache.get("/k0", index)  # emptied when /k3 came in
    assert index.reads == 5


def test_the_writer_process_counts_every_commit_before_it_answers(tmp_path: Path):
    count = ChangeCount.create()
    db, sock = str(tmp_path / "i.db"), str(tmp_path / "w.sock")
    proc = subprocess.Popen([sys.executable, "-m", "mkv.writer", "--db", db, "--socket", sock,
                             "--changes-fd", str(count.fd)], pass_fds=(count.fd,))
    try:
        wait_ready(sock)
        started = count.read()
        assert started >= 1  # counted on start: a predecessor may have died uncounted
        client = WriterClient(sock)
        client.lock("/k")
        assert count.read() == started  # a lock changes nothing that is read
        client.put(rec("/k"))
        after_put = count.read()
        assert after_put > started  # already counted when the answer came
        client.lock("/k")
        client.delete("/k")
        assert count.read() > after_put
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def md5_of(body: bytes) -> str:
    return hashlib.md5(body).hexdigest()


def answers(url: str, n: int = 16) -> set[tuple[int, str | None]]:
    """n GETs, each on a new connection so that every worker answers some."""
    out = set()
    for _ in range(n):
        r = requests.get(url, allow_redirects=False, timeout=10, headers={"Connection": "close"})
        out.add((r.status_code, r.headers.get("Content-Md5")))
    return out


def test_every_worker_answers_each_write_at_once(volumes, make_service):
    """Each worker has read (and kept) the key before every write; right after the write's
    answer, every GET on every worker sees it. Fails when commits are not counted."""
    svc = make_service(volumes, replicas=2, workers=2)
    url = svc.url + "/fresh/key"
    assert answers(url) == {(404, None)}
    for step in range(3):
        body = os.urandom(100 + step)
        assert requests.put(url, data=body, timeout=10).status_code == 201
        assert answers(url) == {(302, md5_of(body))}
        if step == 1:
            assert requests.request("UNLINK", url, timeout=10).status_code == 204
        else:
            assert requests.delete(url, timeout=10).status_code == 204
        assert answers(url) == {(404, None)}
        if step == 1:  # an unlinked key is gone from reads but still there: drop it
            assert requests.delete(url, timeout=10).status_code == 204


def test_a_restarted_writer_still_counts_commits(volumes, make_service):
    svc = make_service(volumes, replicas=2, workers=2)
    url = svc.url + "/fresh/after-restart"
    assert answers(url) == {(404, None)}
    (writer_pid,) = svc.pids("mkv.writer")
    os.kill(writer_pid, signal.SIGKILL)
    wait_until(lambda: replaced(svc, "mkv.writer", writer_pid), 10, "writer restarted")
    deadline = time.monotonic() + 10
    while (status := requests.put(url, data=b"v1", timeout=10).status_code) != 201:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert answers(url) == {(302, md5_of(b"v1"))}
    assert requests.delete(url, timeout=10).status_code == 204
    assert answers(url) == {(404, None)}


def test_a_writer_given_no_shared_count_refuses_to_start(tmp_path: Path):
    """A --changes-fd that is not open (a hand-made command line) is an error at start,
    not a writer that commits without the workers' caches ever hearing of it."""
    out = subprocess.run([sys.executable, "-m", "mkv.writer", "--db", str(tmp_path / "i.db"),
                          "--socket", str(tmp_path / "w.sock"), "--changes-fd", "987"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "cannot start" in out.stderr
    assert not (tmp_path / "w.sock").exists()
