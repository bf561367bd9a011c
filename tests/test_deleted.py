"""Deleted stays deleted: every copy a write attempts is accounted for, and unlinked keys
stay unlinked, through frozen and killed volumes, a killed worker and a killed writer.

Real nginx volumes, a real `mkv serve`, and mkv-rebuild as the judge: what a rebuild
would bring back is what the volumes still hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import requests

from mkv.config import Config
from mkv.model import PendingOp
from tests.cluster import NginxVolume
from tests.helpers import (
    FAST_HEALTH,
    body_for,
    disk_files,
    fetch,
    pending_deletes,
    pending_ops,
    put,
    replicas_of,
    rows,
    run_cli,
    volume_status,
    wait_until,
)
from tests.service import MkvService


def placed_on(volumes: list[NginxVolume], target: NginxVolume, replicas: int, n: int,
              prefix: str) -> list[str]:
    """`n` keys whose ring placement includes `target`."""
    ring = Config(volumes=tuple(v.address for v in volumes)).ring()
    keys = (f"{prefix}{i}" for i in range(10_000))
    return [k for k in keys if target.address in ring.place(k, replicas)][:n]


def start_put(svc: MkvService, key: str, size: int, sent: int, byte: bytes) -> socket.socket:
    """A PUT of `size` bytes of `byte` with only `sent` on the wire so far, once its
    intent is recorded (the upload is under way); the caller sends the rest."""
    sock = socket.create_connection(("127.0.0.1", svc.port))
    sock.sendall(f"PUT {key} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
    sock.sendall(byte * sent)
    wait_until(lambda: any(k == key for k, *_ in pending_ops(svc)), 10, f"the intent of {key}")
    return sock


def freeze(vol: NginxVolume) -> None:
    os.killpg(vol.proc.pid, signal.SIGSTOP)  # master and workers: its own process group


def thaw(vol: NginxVolume) -> None:
    os.killpg(vol.proc.pid, signal.SIGCONT)


def test_a_frozen_volume_leaves_no_copy_a_delete_or_a_rebuild_misses(make_volumes, make_service,
                                                                     tmp_path: Path) -> None:
    vols = make_volumes(4)
    svc = make_service(vols, replicas=2, extra=FAST_HEALTH)
    frozen = vols[0]
    keys = placed_on(vols, frozen, 2, 6, "/freeze/")
    freeze(frozen)
    try:
        with ThreadPoolExecutor(4) as pool:  # PUTs wait on the frozen volume, then re-place
            answers = list(pool.map(lambda k: put(svc, k, body_for(k)).status_code, keys))
        assert answers == [201] * len(keys)
        assert not any(frozen.address in replicas_of(svc, k) for k in keys)
    finally:
        thaw(frozen)
    # the frozen nginx now finishes the uploads it had taken in: copies no record names
    wait_until(lambda: volume_status(svc, frozen.address) == "up", 15, "the volume to be up")
    wait_until(lambda: not pending_ops(svc), 15, "the pending removals to finish")
    orphans = [k for k in keys if disk_files([frozen], k)]
    print(f"orphan copies on the frozen volume after cleanup: {len(orphans)} of {len(keys)} keys")
    assert orphans == []

    for k in keys:
        assert requests.delete(svc.url + quote(k), timeout=10).status_code == 204
    wait_until(lambda: not pending_deletes(svc) and not pending_ops(svc), 15, "cleanup")
    assert svc.stop() == 0
    assert not any(disk_files(vols, k) for k in keys)
    rebuilt = tmp_path / "rebuilt.db"
    proc = run_cli(vols, rebuilt, replicas=2)
    assert proc.returncode in (0, 1), proc.stderr
    assert not [k for k in rows(rebuilt) if k.startswith("/freeze/")]


def sidecars(vols: list[NginxVolume], key: str) -> list[dict]:
    """The key's sidecars on these volumes' disks, any generation."""
    return [json.loads(p.read_text()) for p in disk_files(vols, key) if p.name.endswith(".key")]


def test_unlink_with_a_volume_down_marks_its_sidecar_when_it_returns(make_volumes, make_service,
                                                                     tmp_path: Path) -> None:
    vols = make_volumes(3)
    svc = make_service(vols, replicas=3, extra=FAST_HEALTH)
    keys = [f"/unlink-down/{i}" for i in range(6)]
    for k in keys:
        assert put(svc, k, body_for(k)).status_code == 201
    dead = vols[1]
    dead.kill()
    wait_until(lambda: volume_status(svc, dead.address) == "down", 10, "volume marked down")
    for k in keys:
        assert requests.request("UNLINK", svc.url + quote(k), timeout=10).status_code == 204
        assert fetch(svc, k).status_code == 404
    assert {(k, v, op) for k, v, op, _ in pending_ops(svc)} == {
        (k, dead.address, int(PendingOp.MARK_UNLINKED)) for k in keys}
    assert all(s.get("unlinked") is not True for k in keys for s in sidecars([dead], k))

    dead.restart()
    wait_until(lambda: not pending_ops(svc), 15, "the pending marks to finish")
    for k in keys:
        marks = sidecars(vols, k)
        assert len(marks) == 3 and all(s["unlinked"] is True for s in marks), (k, marks)
    assert svc.stop() == 0
    rebuilt = tmp_path / "rebuilt.db"
    proc = run_cli(vols, rebuilt, replicas=3)
    assert proc.returncode == 0, proc.stderr
    states = {k: row[0] for k, row in rows(rebuilt).items() if k.startswith("/unlink-down/")}
    assert states == {k: 2 for k in keys}  # State.UNLINKED


def test_a_worker_killed_between_upload_and_record_leaves_no_copy(volumes, make_service) -> None:
    """The worker dies with its upload done on some volumes and nothing recorded: its
    writer connection closes, its intents become due, the health process removes them."""
    svc = make_service(volumes, replicas=3, extra=FAST_HEALTH, workers=1)
    key = "/killed/between"
    size = 8 << 20
    sock = start_put(svc, key, size, size - 1, b"k")  # all but the last byte
    (worker,) = [p for p in svc.pids("mkv serve") if p != svc.proc.pid]
    os.kill(worker, signal.SIGKILL)
    sock.close()
    wait_until(lambda: not pending_ops(svc), 15, "the intents to be cleaned up")
    assert fetch(svc, key).status_code == 404
    assert not disk_files(volumes, key)


def test_a_writer_killed_between_intent_and_record(volumes, make_service) -> None:
    """The writer dies while a PUT streams: the upload finishes, the record is written by
    the restarted writer (the intent, orphaned, is still the write's own), nothing is left
    pending and the value reads back whole."""
    svc = make_service(volumes, replicas=3, extra=FAST_HEALTH, workers=1)
    key = "/writer-killed/between"
    size = 8 << 20
    sock = start_put(svc, key, size, size // 2, b"w")
    (writer,) = svc.pids("mkv.writer")
    os.kill(writer, signal.SIGKILL)
    sock.sendall(b"w" * (size - size // 2))
    reply = sock.recv(4096)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 201"), reply
    assert fetch(svc, key).content == b"w" * size
    wait_until(lambda: not pending_ops(svc), 10, "nothing pending")


def test_a_large_put_across_a_writer_restart_never_mixes_with_a_newer_put(volumes,
                                                                         make_service) -> None:
    """A's upload straddles a writer restart (its lock dies); B writes the key in that gap.
    The key reads back as exactly one value, with that value's own md5: B's, since B
    recorded first and A is refused. A's bytes went to files of its own generation, and
    are removed."""
    svc = make_service(volumes, replicas=3, extra=FAST_HEALTH)
    key = "/straddle/key"
    size = 8 << 20
    a = start_put(svc, key, size, size // 2, b"A")
    (writer,) = svc.pids("mkv.writer")
    os.kill(writer, signal.SIGKILL)
    wait_until(lambda: svc.pids("mkv.writer") and svc.pids("mkv.writer") != [writer], 15,
               "the writer to be restarted")
    b_value = b"B" * 3000
    assert put(svc, key, b_value).status_code == 201  # A's lock died with the old writer
    a.sendall(b"A" * (size - size // 2))
    reply = a.recv(4096)
    a.close()
    assert reply.startswith(b"HTTP/1.1 409"), reply  # refused: the key is B's now
    r = fetch(svc, key)
    assert r.content == b_value
    assert r.history[0].headers["Content-Md5"] == hashlib.md5(b_value).hexdigest()
    wait_until(lambda: not pending_ops(svc), 15, "A's copies to be removed")
    assert len(disk_files(volumes, key)) == 6  # B's blob and sidecar on three volumes


def test_a_frozen_volume_costs_a_put_the_detection_time_not_the_volume_timeout(
        make_volumes, make_service) -> None:
    """volume-timeout stays at its default (10 s). Small PUTs waiting on the frozen volume
    give up once the others have answered and it lags far behind (or once it is marked
    down) and place that replica again; a large PUT streaming to it fails as soon as it is
    marked down. Nothing waits for the timeout."""
    vols = make_volumes(4)
    fast_probes = ["--health-interval", "0.2", "--health-timeout", "0.5",
                   "--health-fail-count", "2", "--health-ok-count", "2"]
    svc = make_service(vols, replicas=2, extra=fast_probes)
    frozen = vols[0]
    keys = placed_on(vols, frozen, 2, 8, "/hedge/")
    big = placed_on(vols, frozen, 2, 9, "/hedge-big/")[-1]

    def timed_put(key: str, size: int) -> tuple[int, float]:
        started = time.monotonic()
        return put(svc, key, body_for(key, size)).status_code, time.monotonic() - started

    freeze(frozen)
    try:
        with ThreadPoolExecutor(5) as pool:
            large = pool.submit(timed_put, big, 8 << 20)  # first: the volume is not down yet
            small = list(pool.map(lambda k: timed_put(k, 2000), keys))
            big_status, big_took = large.result()
    finally:
        thaw(frozen)
    print(f"small PUTs: slowest {max(t for _, t in small):.2f}s; large PUT {big_status} "
          f"in {big_took:.2f}s (volume-timeout 10s)")
    assert [s for s, _ in small] == [201] * len(keys)
    assert max(t for _, t in small) < 5.0
    assert big_status in (201, 502, 503) and big_took < 5.0
    for k in keys:
        assert fetch(svc, k).content == body_for(k, 2000)
    wait_until(lambda: volume_status(svc, frozen.address) == "up", 15, "the volume to be up")
    wait_until(lambda: not pending_ops(svc), 15, "the given-up copies to be removed")
    for k in keys + [big]:  # the frozen volume keeps only copies some record names
        named = fetch(svc, k).ok and frozen.address in replicas_of(svc, k)
        assert named or not disk_files([frozen], k), k
