"""mkv-rebalance against real nginx volumes, offline and under a live `mkv serve`."""

from __future__ import annotations

import hashlib
import io
import os
import pty
import random
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import apsw
import pytest
import requests

from mkv import config
from mkv.core import rebalance_plan
from mkv.keys import blob_path, sidecar_path
from mkv.model import Record, State
from mkv.ring import Ring
from mkv.tools.progress import FILE_INTERVAL, TTY_INTERVAL, Progress
from mkv.tools.rebalance import Rebalancer, add_arguments
from mkv.tools.throttle import RateLimiter
from mkv.writer.protocol import LockLost
from mkv.writer.server import serve_in_thread
from tests.cluster import NginxVolume
from tests.helpers import Relay
from tests.service import MkvService

HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --- pure parts ---


def test_plan_copies_missing_drops_unwanted_and_never_touches_lost_keys():
    rec = Record("/k", State.LIVE, ("a:1", "b:2", "c:3"), 5, "m", 0.0)
    move = rebalance_plan(rec, ("a:1", "d:4", "b:2"), {"a:1", "b:2", "c:3"}, {"a:1", "c:3"})
    assert move.copy_to == ("d:4",) and move.sidecar_to == ("b:2",) and move.drop == ("c:3",)
    assert move.sources == ("a:1", "b:2", "c:3")
    repair = rebalance_plan(rec, ("a:1", "b:2", "c:3"), {"a:1", "c:3"}, {"a:1", "c:3"})
    assert repair.copy_to == ("b:2",) and repair.drop == () and repair.sources == ("a:1", "c:3")
    lost = rebalance_plan(rec, ("a:1", "b:2", "c:3"), set(), set())
    assert lost.lost and lost.noop
    assert rebalance_plan(rec, rec.volumes, set(rec.volumes), set(rec.volumes)).noop


def test_rate_limiter():
    lim = RateLimiter(1000, burst=1000)
    assert lim.delay(1000, 0.0) == 0.0
    assert lim.delay(500, 0.0) == pytest.approx(0.5)
    assert lim.delay(0, 1.0) == 0.0  # refilled
    assert RateLimiter(0).delay(10**9, 0.0) == 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_rewritten_on_a_terminal_and_a_line_every_10s_in_a_file():
    clock = Clock()
    tty, log, quiet = Terminal(), io.StringIO(), Terminal()
    shows = [Progress(out, clock=clock) for out in (tty, log)] + [
        Progress(quiet, enabled=False, clock=clock)]
    assert (shows[0].interval, shows[1].interval) == (TTY_INTERVAL, FILE_INTERVAL) == (0.25, 10)
    for i in range(1, 81):  # 20 s, a quarter second at a time
        clock.now += 0.25
        for show in shows:
            show.show(f"at {i}")
    for show in shows:
        show.end()
    assert tty.getvalue().count("\r") == 80 and tty.getvalue().endswith("\rat 80\x1b[K\n")
    assert "\n" not in tty.getvalue()[:-1]  # one line, rewritten in place
    assert log.getvalue() == "at 40\nat 80\n"  # every 10 s, each on its own line
    assert quiet.getvalue() == ""


# --- helpers ---


def value(key: str) -> bytes:
    seed = hashlib.sha256(key.encode()).digest()
    n = 100 + seed[0] * 8
    return (seed * (n // 32 + 1))[:n]


def load(svc: MkvService, keys: list[str], body=value) -> None:
    def one(k: str) -> None:
        r = requests.put(svc.url + quote(k), data=body(k), timeout=30)
        assert r.status_code == 201, (k, r.status_code, r.text)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, keys))


def records(db: str) -> dict[str, Record]:
    conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = conn.execute("SELECT key, state, volumes, size, md5, mtime, gen FROM keys").fetchall()
    finally:
        conn.close()
    return {r[0]: Record(r[0], State(r[1]), tuple(r[2].split(",")), r[3], r[4], r[5], r[6])
            for r in rows}


def blob_of(db: str, key: str) -> str:
    """The key's blob path on a volume's disk (relative), with the recorded generation."""
    return blob_path(key, records(db)[key].gen)[1:]


def sidecar_of(db: str, key: str) -> str:
    return sidecar_path(key, records(db)[key].gen)[1:]


def on_disk(vols: list[NginxVolume]) -> set[tuple[str, str]]:
    """(volume, file name) of every blob and sidecar on every volume's disk."""
    found = set()
    for v in vols:
        for path in v.root.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*"):
            found.add((v.address, path.name))
    return found


def expected_files(recs: dict[str, Record]) -> set[tuple[str, str]]:
    out = set()
    for rec in recs.values():
        name = blob_path(rec.key, rec.gen).rsplit("/", 1)[1]  # <h>[.<gen>]
        for vol in rec.volumes:
            out |= {(vol, name), (vol, name + ".key")}
    return out


def rebalance(svc_or_db, volumes: list[NginxVolume], *extra: str, replicas: int = 3,
              timeout: float = 120) -> subprocess.CompletedProcess:
    db = svc_or_db.db if isinstance(svc_or_db, MkvService) else svc_or_db
    return subprocess.run(
        [sys.executable, "-m", "mkv.tools.rebalance", "--volumes",
         ",".join(v.address for v in volumes), "--db", db, "--replicas", str(replicas), *extra],
        capture_output=True, text=True, timeout=timeout)


def summary(stderr: str) -> dict[str, int]:
    line = [ln for ln in stderr.splitlines() if "done:" in ln][-1]
    return {name: int(n) for name, n in re.findall(r"(moved|copies|sidecars|deletions) (\d+)", line)}


def assert_clean(db: str, vols: list[NginxVolume], ring_vols: list[NginxVolume], replicas: int):
    recs = records(db)
    ring = Ring([v.address for v in ring_vols])
    for rec in recs.values():
        assert rec.volumes == tuple(ring.place(rec.key, replicas)), rec.key
    assert on_disk(vols) == expected_files(recs)
    return recs


def read_all(svc: MkvService, keys, body=value) -> None:
    def one(k: str) -> None:
        r = requests.get(svc.url + quote(k), timeout=30)
        assert r.status_code == 200 and r.content == body(k), k

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, keys))


KEYS = [f"/reb/{i:04d}" for i in range(950)] + [f"/ü/ключ {i}/x%y" for i in range(50)]


@pytest.fixture
def four(make_volumes):
    return make_volumes(4)


# --- scenarios ---


def test_add_a_fourth_volume(four, make_service, tmp_path):
    svc = make_service(four[:3], replicas=3)
    load(svc, KEYS)
    svc.stop()

    r = rebalance(svc, four)
    assert r.returncode == 0, r.stderr
    s = summary(r.stderr)
    # each key needs the new volume with probability 3/4: a quarter of all copies move
    assert 0.2 < s["copies"] / (len(KEYS) * 3) < 0.3, s
    assert s["deletions"] == s["copies"] and s["moved"] == s["copies"]
    assert_clean(svc.db, four, four, 3)

    svc4 = MkvService(tmp_path / "svc4", [v.address for v in four], replicas=3, db=svc.db).start()
    try:
        read_all(svc4, KEYS)
        head = requests.head(svc4.url + "/reb/0001", allow_redirects=False)
        assert head.headers["Key-Balance"] == "balanced"
    finally:
        svc4.stop()

    again = rebalance(svc, four)
    assert again.returncode == 0 and summary(again.stderr) == {
        "moved": 0, "copies": 0, "sidecars": 0, "deletions": 0}


def test_drain_a_volume(four, make_service, tmp_path):
    svc = make_service(four, replicas=2)
    keys = KEYS[:300]
    load(svc, keys)
    svc.stop()
    r = rebalance(svc, four[:3], replicas=2)
    assert r.returncode == 0, r.stderr
    recs = assert_clean(svc.db, four, four[:3], 2)
    assert not any(four[3].address in rec.volumes for rec in recs.values())
    assert not list(four[3].root.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*"))


def test_repairs_lost_replicas_and_reports_lost_keys(volumes, make_service):
    svc = make_service(volumes, replicas=3)
    keys = KEYS[:60]
    load(svc, keys)
    svc.stop()
    victim, sidecar_only, lost = keys[0], keys[1], keys[2]
    v0 = volumes[0]
    (v0.root / blob_of(svc.db, victim)).unlink()
    (v0.root / sidecar_of(svc.db, victim)).unlink()
    (volumes[1].root / sidecar_of(svc.db, sidecar_only)).unlink()
    for v in volumes:
        (v.root / blob_of(svc.db, lost)).unlink()
    before = records(svc.db)[lost]

    r = rebalance(svc, volumes)
    assert r.returncode == 1
    assert repr(lost) in r.stderr and "no good copy" in r.stderr
    s = summary(r.stderr)
    assert s["copies"] == 1 and s["sidecars"] == 2
    assert (v0.root / blob_of(svc.db, victim)).read_bytes() == value(victim)
    assert (volumes[1].root / sidecar_of(svc.db, sidecar_only)).exists()
    assert records(svc.db)[lost] == before  # reported, not touched


def test_dry_run_changes_nothing(four, make_service):
    svc = make_service(four[:3], replicas=3)
    load(svc, KEYS[:200])
    svc.stop()
    disk = on_disk(four)
    recs = records(svc.db)
    r = subprocess.run([sys.executable, "-m", "mkv.tools.rebalance", "--dry-run", "--volumes",
                        ",".join(v.address for v in four), "--db", svc.db],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    m = re.search(r"(\d+) keys, (\d+) to move, (\d+) copies", r.stdout)
    assert m and int(m.group(1)) == 200 and 100 < int(m.group(2)) < 200
    assert on_disk(four) == disk and records(svc.db) == recs


def test_rebalance_under_live_load_loses_nothing_and_resurrects_nothing(four, make_service,
                                                                         tmp_path):
    svc3 = make_service(four[:3], replicas=3)
    base = KEYS[:400]
    load(svc3, base)
    svc3.stop()
    # the same index, served with the new volume set
    svc = MkvService(tmp_path / "live", [v.address for v in four], replicas=3, db=svc3.db).start()
    believed: dict[str, bytes | None] = {k: value(k) for k in base}
    lock = threading.Lock()
    stop = threading.Event()

    def client(seed: int) -> None:
        rnd = random.Random(seed)
        n = 0
        while not stop.is_set():
            with lock:
                existing = [k for k, v in believed.items() if v is not None]
            op = rnd.random()
            if op < 0.4:
                k, body = f"/live/{seed}/{n}", os.urandom(rnd.randint(50, 3000))
                n += 1
                r = requests.put(svc.url + quote(k), data=body, timeout=30)
                if r.status_code == 201:
                    with lock:
                        believed[k] = body
            elif op < 0.6 and existing:
                k = rnd.choice(existing)
                r = requests.delete(svc.url + quote(k), timeout=30)
                if r.status_code == 204:
                    with lock:
                        believed[k] = None
            elif existing:
                k = rnd.choice(existing)
                requests.get(svc.url + quote(k), timeout=30)

    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client, s) for s in range(6)]
            time.sleep(0.5)
            r = rebalance(svc, four)
            time.sleep(0.5)
            stop.set()
            for f in futures:
                f.result()
        assert r.returncode == 0, r.stderr
        for k, body in believed.items():
            got = requests.get(svc.url + quote(k), timeout=30)
            if body is None:
                assert got.status_code == 404, k
            else:
                assert got.status_code == 200 and got.content == body, k
        assert any(v is None for v in believed.values()) and len(believed) > 450
    finally:
        svc.stop()
    # with the load stopped, a last pass leaves everything in place and nothing orphaned
    assert rebalance(svc, four).returncode == 0
    recs = assert_clean(svc.db, four, four, 3)
    assert {k for k, v in believed.items() if v is not None} == {
        k for k, rec in recs.items() if rec.state is State.LIVE}


def test_killed_midway_then_run_again_ends_clean(four, make_service, tmp_path):
    svc = make_service(four[:3], replicas=3)
    big = lambda k: value(k) * 200  # noqa: E731 - ~100-400 KB each
    keys = KEYS[:150]
    load(svc, keys, body=big)
    svc.stop()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mkv.tools.rebalance", "--volumes",
         ",".join(v.address for v in four), "--db", svc.db, "--limit-rate", "4000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2.5)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    halfway = records(svc.db)
    ring = Ring([v.address for v in four])
    assert 0 < sum(rec.volumes == tuple(ring.place(k, 3)) for k, rec in halfway.items()) < len(keys)

    r = rebalance(svc, four)
    assert r.returncode == 0, r.stderr
    assert_clean(svc.db, four, four, 3)
    svc4 = MkvService(tmp_path / "after-kill", [v.address for v in four], replicas=3,
                      db=svc.db).start()
    try:
        read_all(svc4, keys, body=big)
    finally:
        svc4.stop()


def test_pending_deletes_are_finished(volumes, make_service):
    svc = make_service(volumes, replicas=3,
                       extra=["--health-interval", "0.2", "--health-timeout", "0.3",
                              "--volume-timeout", "1"])
    load(svc, KEYS[:20])
    volumes[2].kill()
    time.sleep(1.5)
    assert requests.delete(svc.url + quote(KEYS[0])).status_code == 204
    svc.stop()
    volumes[2].restart()
    assert records(svc.db)[KEYS[0]].state is State.DELETING
    doomed = blob_of(svc.db, KEYS[0])
    r = rebalance(svc, volumes)
    assert r.returncode == 0, r.stderr
    assert KEYS[0] not in records(svc.db)
    assert not (volumes[2].root / doomed).exists()


def test_usage_errors_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkv.tools.rebalance", "--volumes", "a:1",
                        "--replicas", "1", "--db", str(tmp_path / "missing.db")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "cannot read the index" in r.stderr
    r = subprocess.run([sys.executable, "-m", "mkv.tools.rebalance", "--bogus"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2


def test_a_dead_volume_is_reported_and_nothing_is_lost(volumes, make_service):
    svc = make_service(volumes, replicas=3)
    keys = KEYS[:20]
    load(svc, keys)
    svc.stop()
    before = records(svc.db)
    volumes[0].kill()
    r = rebalance(svc, volumes, "--volume-timeout", "1")
    assert r.returncode == 1
    assert all(repr(k) in r.stderr for k in keys)  # each key listed: its copy cannot be made
    assert records(svc.db) == before  # the index still names every copy it had
    volumes[0].restart()
    assert rebalance(svc, volumes).returncode == 0
    assert_clean(svc.db, volumes, volumes, 3)


class CuttingProxy(Relay):
    """A volume's address whose answers stop after `limit` bytes per connection: a
    source that breaks mid-copy (HEADs and small answers pass; big GETs are torn)."""

    def __init__(self, upstream: NginxVolume, limit: int | None) -> None:
        super().__init__(upstream.port)
        self.limit, self.root = limit, upstream.root
        self.address = f"127.0.0.1:{self.port}"

    def answer_limit(self, n: int) -> int | None:
        return self.limit


BIG = 2 << 20


def big(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest() * (BIG // 32)


def test_a_source_torn_mid_copy_gives_way_to_the_next(make_volumes, make_service):
    vols = make_volumes(3)
    torn = CuttingProxy(vols[0], limit=BIG // 2)
    try:
        svc = make_service([torn, vols[1]], replicas=2)
        keys = [f"/torn/{i}" for i in range(30)]
        load(svc, keys, body=big)
        svc.stop()
        ring = Ring([torn.address, vols[1].address, vols[2].address])
        first_torn = [k for k, rec in records(svc.db).items()
                      if rec.volumes[0] == torn.address and vols[2].address in ring.place(k, 2)]
        assert first_torn  # keys whose first source breaks mid-copy
        r = rebalance(svc, [torn, vols[1], vols[2]], replicas=2)
        assert r.returncode == 0, r.stderr
        recs = records(svc.db)
        root = {torn.address: vols[0].root, vols[1].address: vols[1].root,
                vols[2].address: vols[2].root}
        for k in keys:
            assert recs[k].volumes == tuple(ring.place(k, 2))
            for vol in recs[k].volumes:
                assert (root[vol] / blob_of(svc.db, k)).read_bytes() == big(k)
        assert_clean(svc.db, [torn, vols[1], vols[2]], [torn, vols[1], vols[2]], 2)
    finally:
        torn.close()


def test_no_whole_source_reports_the_key_and_leaves_no_orphan(make_volumes, make_service):
    vols = make_volumes(2)
    torn = CuttingProxy(vols[0], limit=BIG // 2)
    try:
        svc = make_service([torn], replicas=1)
        keys = [f"/orphan/{i}" for i in range(24)]
        load(svc, keys, body=big)
        svc.stop()
        before = records(svc.db)
        ring = Ring([torn.address, vols[1].address])
        moving = [k for k in keys if ring.place(k, 1) == [vols[1].address]]
        assert moving
        r = rebalance(svc, [torn, vols[1]], replicas=1)
        assert r.returncode == 1
        assert all(repr(k) in r.stderr for k in moving)
        assert records(svc.db) == before  # still pointing at the whole copies
        assert on_disk([vols[1]]) == set()  # the torn copies were removed
        torn.limit = None  # the source reads whole again: the next run finishes the job
        assert rebalance(svc, [torn, vols[1]], replicas=1).returncode == 0
        assert_clean(svc.db, [torn, vols[1]], [torn, vols[1]], 1)
    finally:
        torn.close()


def test_a_copy_whose_sidecar_cannot_be_written_is_removed(make_volumes, make_service):
    a, b = make_volumes(2)
    svc = make_service([a], replicas=1)
    keys = [f"/side/{i}" for i in range(24)]
    load(svc, keys)
    svc.stop()
    before = records(svc.db)
    moving = [k for k in keys if Ring([a.address, b.address]).place(k, 1) == [b.address]]
    assert moving
    for k in moving:  # a directory where the sidecar goes: nginx refuses that PUT
        (b.root / sidecar_of(svc.db, k)).mkdir(parents=True)
    r = rebalance(svc, [a, b], replicas=1)
    assert r.returncode == 1
    assert all(repr(k) in r.stderr and "sidecar" in r.stderr for k in moving)
    assert records(svc.db) == before
    for k in moving:  # the blob that did arrive is gone again: nothing names it
        assert not (b.root / blob_of(svc.db, k)).exists()


def test_service_writer_killed_mid_rebalance_loses_nothing(four, make_service):
    svc = make_service(four[:3], replicas=3)
    big = lambda k: value(k) * 200  # noqa: E731 - ~100-400 KB each
    keys = KEYS[:150]
    load(svc, keys, body=big)
    # the service keeps running on its three volumes; the rebalance goes to four through
    # the service's writer, which is SIGKILLed halfway (its supervisor restarts it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mkv.tools.rebalance", "--volumes",
         ",".join(v.address for v in four), "--db", svc.db, "--limit-rate", "4000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)
    assert proc.poll() is None, "finished before the writer could be killed"
    (writer,) = svc.pids("mkv.writer")
    os.kill(writer, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    # keys in flight wait for the restarted writer, re-take their locks and carry on
    assert proc.returncode == 0, err
    deadline = time.monotonic() + 10
    while [p for p in svc.pids("mkv.writer") if p != writer] == [] and time.monotonic() < deadline:
        time.sleep(0.1)
    read_all(svc, keys, body=big)  # every key readable, through the restarted writer
    svc.stop()
    r = rebalance(svc, four)
    assert r.returncode == 0, r.stderr
    assert_clean(svc.db, four, four, 3)


def test_no_copy_is_deleted_once_the_key_lock_died_with_its_writer(volumes, make_service):
    svc = make_service(volumes, replicas=3)
    load(svc, ["/held"])
    svc.stop()
    cfg, _ = config.load(["--volumes", ",".join(v.address for v in volumes), "--db", svc.db],
                         prog="t", description="t", extend=add_arguments)
    server, thread = serve_in_thread(cfg.db, cfg.writer_socket)
    rb = Rebalancer(cfg, concurrency=1, limit_rate=0, verify=False)
    held = rb.writer.lock("/held")
    blob = volumes[0].root / blob_path("/held", held.gen)[1:]
    server.stop()  # the writer dies, and the lock with it; another one takes its place
    thread.join(10)
    server, thread = serve_in_thread(cfg.db, cfg.writer_socket)
    try:
        with pytest.raises(LockLost):
            rb._drop(held, (volumes[0].address,))
        assert blob.exists()
        rb.writer.lock("/held")  # held again, on a new connection: now it may delete
        assert rb._drop(held, (volumes[0].address,)) == []
        assert not blob.exists()
    finally:
        server.stop()
        thread.join(10)


def test_verify_replaces_a_corrupt_copy_of_the_right_size(volumes, make_service):
    svc = make_service(volumes, replicas=3)
    one, every = "/verify/one-bad-copy", "/verify/all-bad"
    load(svc, [one, every])
    svc.stop()

    def corrupt(vol: NginxVolume, key: str) -> None:
        blob = vol.root / blob_of(svc.db, key)
        data = bytearray(blob.read_bytes())
        data[0] ^= 0xFF  # same size, other bytes: only an md5 tells
        blob.write_bytes(bytes(data))

    corrupt(volumes[0], one)
    for vol in volumes:
        corrupt(vol, every)
    before = records(svc.db)
    assert rebalance(svc, volumes).returncode == 0  # sizes alone look fine: nothing done
    assert (volumes[0].root / blob_of(svc.db, one)).read_bytes() != value(one)

    r = rebalance(svc, volumes, "--verify")
    assert r.returncode == 1
    assert repr(every) in r.stderr and "no good copy" in r.stderr  # reported, left alone
    assert repr(one) not in r.stderr
    for vol in volumes:
        assert (vol.root / blob_of(svc.db, one)).read_bytes() == value(one)
    assert records(svc.db) == before


class PtyRun:
    """mkv-rebalance with its stderr on a terminal (a pty), read as it comes."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
        os.close(slave)
        self.master = master
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            self.chunks.append(data)

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def finish(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(10)
        os.close(self.master)
        return code


def test_ctrl_c_on_a_terminal_stops_in_order_with_a_summary_and_exit_130(four, make_service):
    svc = make_service(four[:3], replicas=3)
    big = lambda k: value(k) * 200  # noqa: E731 - ~100-400 KB each
    keys = KEYS[:80]
    load(svc, keys, body=big)
    svc.stop()
    argv = [sys.executable, "-m", "mkv.tools.rebalance", "--volumes",
            ",".join(v.address for v in four), "--db", svc.db]
    run = PtyRun([*argv, "--limit-rate", "2000000"])
    moved = re.compile(r"\rmkv-rebalance: progress: examined \d+/80, moved [1-9]")
    deadline = time.monotonic() + 60
    while not moved.search(run.output):
        assert run.proc.poll() is None, f"finished before it could be interrupted:\n{run.output}"
        assert time.monotonic() < deadline, run.output
        time.sleep(0.05)
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.output
    out = run.output
    assert "\x1b[K" in out  # the progress line was rewritten in place
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    summary_line = [ln for ln in out.splitlines() if "mkv-rebalance: interrupted:" in ln]
    assert len(summary_line) == 1, out
    assert re.search(r"examined \d+/80, moved [1-9]\d*, .*run it again to finish", summary_line[0])
    # stopped in order: every copy on disk is one the index names, none half made
    halfway = records(svc.db)
    assert on_disk(four) == expected_files(halfway)
    ring = Ring([v.address for v in four])
    assert 0 < sum(rec.volumes == tuple(ring.place(k, 3)) for k, rec in halfway.items()) < len(keys)

    quiet = PtyRun([*argv, "--quiet"])
    assert quiet.finish() == 0, quiet.output
    assert "progress" not in quiet.output
    assert [ln for ln in quiet.output.splitlines() if ln.strip()] == [
        ln for ln in quiet.output.splitlines() if "mkv-rebalance: done: examined 80/80" in ln]
    assert_clean(svc.db, four, four, 3)


def test_sigterm_with_the_output_in_a_pipe_stops_in_order_too(four, make_service):
    svc = make_service(four[:3], replicas=3)
    big = lambda k: value(k) * 200  # noqa: E731 - ~100-400 KB each
    load(svc, KEYS[:60], body=big)
    svc.stop()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mkv.tools.rebalance", "--volumes",
         ",".join(v.address for v in four), "--db", svc.db, "--limit-rate", "1000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(four[3].root.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*")):
        assert proc.poll() is None, "finished before it could be stopped"
        assert time.monotonic() < deadline, "no copy to the new volume"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "\r" not in err and "Traceback" not in err
    assert "mkv-rebalance: interrupted: examined " in err and "run it again to finish" in err
    assert on_disk(four) == expected_files(records(svc.db))
    assert rebalance(svc, four).returncode == 0
    assert_clean(svc.db, four, four, 3)
