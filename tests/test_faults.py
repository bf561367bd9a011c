"""Failure is a feature: real processes killed with real signals while mkv serves.

Volumes are SIGKILLed nginx groups, the writer and workers are SIGKILLed inside a
running `mkv serve`, and a "volume" that accepts connections but never answers is
a plain socket; the gap a writer restart opens under a held lock is made by cutting
one writer connection. Health settings are fast so the tests are short.
"""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
import requests

from mkv.config import Config
from mkv.index import schema
from mkv.index.reader import Reader
from mkv.model import Record, State
from mkv.ring import Ring
from mkv.service.server import build_store
from mkv.service.store import InFlight
from mkv.writer.client import WriterClient
from mkv.writer.protocol import KeyLocked
from mkv.writer.server import serve_in_thread
from tests.helpers import (
    FAST_HEALTH,
    body_for,
    disk_files,
    fetch,
    on_disk,
    pending_deletes,
    pending_ops,
    put,
    replaced,
    replicas_of,
    settle,
    volume_status,
    wait_until,
)


def test_one_volume_killed_reads_writes_deletes_continue_and_cleanup_runs_on_return(
        make_volumes, make_service):
    vols = make_volumes(3)
    svc = make_service(vols, replicas=2, extra=FAST_HEALTH)
    keys = {f"/one/{i}": body_for(f"/one/{i}", 2000 if i % 4 else (3 << 20)) for i in range(24)}
    for k, b in keys.items():
        assert put(svc, k, b).status_code == 201
    dead = vols[0]
    on_dead = [k for k in keys if dead.address in replicas_of(svc, k)]
    assert on_dead, "no key was placed on the volume to kill"

    dead.kill()
    took = wait_until(lambda: volume_status(svc, dead.address) == "down", 10, "volume marked down")
    print(f"volume marked down {took:.2f}s after SIGKILL")
    settle()

    for k, b in keys.items():  # every key still readable, bytes intact, via a live replica
        r = fetch(svc, k)
        assert r.status_code == 200 and r.content == b, k

    for i in range(12):  # writes keep R=2 copies on the two live volumes
        k = f"/one/new/{i}"
        assert put(svc, k, body_for(k, 5000 if i % 3 else (2 << 20))).status_code == 201
        assert dead.address not in replicas_of(svc, k)
        assert fetch(svc, k).content == body_for(k, 5000 if i % 3 else (2 << 20))

    doomed = on_dead[:4]
    for k in doomed:  # deletes succeed at once; the copy on the dead volume is remembered
        assert requests.delete(svc.url + quote(k), timeout=10).status_code == 204
        assert fetch(svc, k).status_code == 404
    pending = dict(pending_deletes(svc))
    assert set(doomed) <= set(pending)
    assert all(pending[k] == dead.address for k in doomed)
    assert all(on_disk(dead, k) for k in doomed)

    dead.restart()
    took = wait_until(lambda: volume_status(svc, dead.address) == "up", 10, "volume marked up")
    print(f"volume marked up {took:.2f}s after restart")
    wait_until(lambda: not pending_deletes(svc), 10, "pending deletes to finish")
    assert not any(on_disk(dead, k) for k in doomed)
    assert all(on_disk(dead, k) for k in on_dead[4:])
    assert requests.get(svc.url + "/-/health", timeout=5).status_code == 200


def test_two_of_three_killed_with_two_replicas(make_volumes, make_service):
    vols = make_volumes(3)
    svc = make_service(vols, replicas=2, extra=FAST_HEALTH)
    keys = {f"/two/{i}": body_for(f"/two/{i}") for i in range(30)}
    for k, b in keys.items():
        assert put(svc, k, b).status_code == 201
    placed = {k: replicas_of(svc, k) for k in keys}
    survivor = vols[2]
    for v in vols[:2]:
        v.kill()
    for v in vols[:2]:
        wait_until(lambda v=v: volume_status(svc, v.address) == "down", 10, "volumes down")
    settle()

    for k, b in keys.items():
        r = fetch(svc, k)
        if survivor.address in placed[k]:
            assert r.status_code == 200 and r.content == b
        else:
            assert r.status_code == 503 and r.json()["error"] == "unavailable"
    r = put(svc, "/two/new", b"x" * 100)
    assert r.status_code == 503
    assert requests.get(svc.url + "/two/new", allow_redirects=False).status_code == 404
    # reads still go to the survivor: a load balancer keeps this instance for them
    health = requests.get(svc.url + "/-/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert health.json()["readable"] is True and health.json()["writable"] is False
    assert requests.get(svc.url + "/-/health?writable", timeout=5).status_code == 503


def test_writer_killed_during_32_concurrent_puts_loses_no_acknowledged_write(volumes, make_service):
    # default health settings: this test is about the writer, and a loaded machine must not
    # get volumes marked down by 0.5 s probe timeouts
    svc = make_service(volumes, replicas=3, workers=2)
    results: dict[str, int] = {}
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            key = f"/burst/{n}/{i}"
            try:
                results[key] = put(svc, key, body_for(key, 1500)).status_code
            except requests.RequestException:
                results[key] = -1
            i += 1

    pool = ThreadPoolExecutor(32)
    futures = [pool.submit(client, n) for n in range(32)]
    time.sleep(1.0)
    (writer_pid,) = svc.pids("mkv.writer")
    os.kill(writer_pid, signal.SIGKILL)
    time.sleep(1.5)
    stop.set()
    for f in futures:
        f.result()
    pool.shutdown()

    wait_until(lambda: replaced(svc, "mkv.writer", writer_pid),
               10, "writer restarted")
    acknowledged = [k for k, s in results.items() if s == 201]
    assert len(acknowledged) > 50
    for k in acknowledged:  # every 201 answered before or after the kill is still true
        r = fetch(svc, k)
        assert r.status_code == 200 and r.content == body_for(k, 1500), (k, r.status_code, r.text)
    # none leaked: the health process may hold one for a moment while it removes the
    # copies of PUTs cut by the kill, and lets it go
    wait_until(lambda: requests.get(svc.url + "/-/health", timeout=5).json()["writer"]["locks"] == 0,
               10, "no lock left")
    for k, s in results.items():  # no key left locked: a retry is stored or already there
        if s != 201:
            assert put(svc, k, body_for(k, 1500)).status_code in (201, 403), k
    assert put(svc, "/burst/after", b"after").status_code == 201


def test_worker_killed_mid_large_put_leaves_no_key_and_no_lock(volumes, make_service):
    svc = make_service(volumes, replicas=3, extra=FAST_HEALTH, workers=1)
    (master,) = [p for p in svc.pids("mkv serve") if p == svc.proc.pid]
    key = "/killed/worker"
    size = 64 << 20
    sock = socket.create_connection(("127.0.0.1", svc.port))
    sock.sendall(f"PUT {key} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
    for _ in range(16):
        sock.sendall(b"w" * (1 << 20))
    workers = [p for p in svc.pids("mkv serve") if p != master]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    sock.close()

    wait_until(lambda: any(p not in workers and p != master for p in svc.pids("mkv serve")), 15,
               "gunicorn to replace the worker")
    wait_until(lambda: requests.get(svc.url + "/-/health", timeout=5).status_code == 200, 10,
               "service healthy")
    # the dead worker's intents are due now: the health process removes those copies,
    # each under the key's lock for a moment; once it is done no lock is left
    wait_until(lambda: not pending_ops(svc), 15, "the dead worker's copies to be removed")
    wait_until(lambda: requests.get(svc.url + "/-/health").json()["writer"]["locks"] == 0, 5,
               "no lock left")
    assert fetch(svc, key).status_code == 404
    assert key not in requests.get(svc.url + "/killed/?list").json()["keys"]
    assert not any(p.name.endswith(".key") for p in disk_files(volumes, key))
    assert put(svc, key, b"second try").status_code == 201
    assert fetch(svc, key).content == b"second try"


def test_silent_volume_is_marked_down_and_requests_do_not_hang(silent_volume, make_volumes,
                                                               make_service):
    real = make_volumes(3)
    silent = silent_volume
    svc = make_service(real + [silent], replicas=2, extra=FAST_HEALTH)
    start = time.monotonic()
    took = wait_until(lambda: volume_status(svc, silent.address) == "down", 10,
                      "silent volume marked down")
    # 2 failed probes of 0.5 s each, 0.2 s apart, plus publishing
    assert took < 4.0, took
    settle()
    worst = 0.0
    for i in range(30):
        t = time.monotonic()
        r = put(svc, f"/silent/{i}", b"v" * 300)
        worst = max(worst, time.monotonic() - t)
        assert r.status_code == 201
        assert silent.address not in replicas_of(svc, f"/silent/{i}")
    assert worst < 1.5, worst
    print(f"silent volume down after {time.monotonic() - start:.2f}s; "
          f"slowest PUT {worst:.3f}s")


def test_silent_volume_before_health_notices_costs_one_timeout_not_a_hang(silent_volume,
                                                                         make_volumes,
                                                                         make_service):
    """With slow probes, a PUT that lands on the silent volume waits volume-timeout, then
    takes the next healthy volume clockwise: 201, never a hang."""
    real = make_volumes(3)
    silent = silent_volume
    svc = make_service(real + [silent], replicas=2,
                       extra=["--health-interval", "30", "--volume-timeout", "1"])
    keys = [f"/slow/{i}" for i in range(40)]
    ring = Ring(svc.volumes)
    victim = next(k for k in keys if silent.address in ring.place(k, 2))
    t = time.monotonic()
    r = put(svc, victim, b"v" * 300)
    took = time.monotonic() - t
    assert r.status_code == 201 and took < 3.0, (r.status_code, took)
    assert silent.address not in replicas_of(svc, victim)
    assert fetch(svc, victim).content == b"v" * 300


def test_stalled_client_is_dropped_and_releases_the_lock(volumes, make_service):
    svc = make_service(volumes, extra=["--client-timeout", "1"])
    sock = socket.create_connection(("127.0.0.1", svc.port))
    try:
        sock.sendall(b"PUT /stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        time.sleep(0.3)
        assert put(svc, "/stalled", b"other").status_code == 409  # the stalled PUT holds it
        wait_until(lambda: put(svc, "/stalled", b"other").status_code == 201, 5,
                   "the stalled upload to be dropped")
        assert fetch(svc, "/stalled").content == b"other"
    finally:
        sock.close()


def test_health_process_killed_is_restarted(volumes, make_service):
    svc = make_service(volumes, extra=FAST_HEALTH)
    wait_until(lambda: volume_status(svc, volumes[0].address) == "up", 10, "first probe")
    (health_pid,) = svc.pids("mkv.health")
    os.kill(health_pid, signal.SIGKILL)
    wait_until(lambda: replaced(svc, "mkv.health", health_pid), 10, "health restarted")

    def checked() -> float:
        return requests.get(svc.url + "/-/health").json()["volumes"][0]["checked"]

    first = checked()
    wait_until(lambda: checked() > first, 5, "probes to resume")
    assert put(svc, "/after-health-kill", b"x").status_code == 201


def test_health_process_stays_down_means_unknown_not_down(volumes, make_service):
    """With the health process gone (SIGSTOP), stale rows become unknown: keys stay readable."""
    svc = make_service(volumes, extra=FAST_HEALTH)
    assert put(svc, "/stale", b"stale").status_code == 201
    (health_pid,) = svc.pids("mkv.health")
    os.kill(health_pid, signal.SIGSTOP)
    try:
        time.sleep(3.0)  # several intervals: the published rows are now stale
        statuses = {v["status"] for v in requests.get(svc.url + "/-/health").json()["volumes"]}
        assert statuses == {"unknown"}
        assert fetch(svc, "/stale").content == b"stale"
        assert put(svc, "/stale2", b"x").status_code == 201
    finally:
        os.kill(health_pid, signal.SIGCONT)


def test_a_delete_whose_lock_died_with_the_writer_connection_spares_a_newer_put(volumes, tmp_path):
    """The gap a writer restart opens: the DELETE's lock is gone, another client writes
    the key, and the DELETE's retried last step must not remove that client's record."""
    cfg = Config(volumes=tuple(v.address for v in volumes), db=str(tmp_path / "i.db"), replicas=3)
    server, thread = serve_in_thread(cfg.db, cfg.writer_socket)
    try:
        store = build_store(cfg, None)  # as a worker builds it, without a record cache
        body = b"first value"
        store.put("/gap", len(body), io.BytesIO(body).read, None)
        other = WriterClient(cfg.writer_socket)
        newer: list[Record] = []
        health = store.health

        def gap() -> dict:
            # the DELETE holds the key (DELETING) when its writer connection dies...
            store.writer._sock.shutdown(socket.SHUT_RDWR)
            deadline = time.monotonic() + 5
            while True:  # ...the writer drops its locks; another client re-puts the key
                try:
                    current = other.lock("/gap")
                    break
                except KeyLocked:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            assert current.state is State.DELETING
            newer.append(dataclasses.replace(current, state=State.LIVE, md5="newer", mtime=2.0))
            other.put(newer[0])
            return health()

        store.health = gap
        with pytest.raises(InFlight):
            store.delete("/gap")
        assert Reader(lambda: schema.connect(cfg.db)).get("/gap") == newer[0]
    finally:
        server.stop()
        thread.join(10)
