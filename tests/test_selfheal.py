"""Self-healing against real nginx volumes and a real `mkv serve` (docs/design.md,
"Self-healing"): a wiped disk is found replaced by its missing marker, reads avoid it,
and the repair process makes every copy whole again; mkv-scrub finds and mends lost and
rotten copies, and leaves a key with no good copy alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import apsw
import pytest
import requests

from mkv import identity
from mkv.index import schema
from mkv.tools import scan
from mkv.writer.client import WriterClient
from tests.cluster import NginxVolume
from tests.helpers import (
    CLIENT,
    FAST_HEALTH,
    REPO,
    TIMEOUT,
    blob_rel,
    body_for,
    index_record,
    kurl,
    put,
    run_cli,
)

KEYS = [f"/heal/{i:03d}" for i in range(60)]
WAIT = 60.0  # bounds on waits: never a timing assertion


def wait_for(what, deadline_s: float = WAIT, step: float = 0.05):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"not within {deadline_s:.0f}s: {what.__doc__ or what}")


def status_of(svc, vol: str) -> str:  # noqa: ANN001
    body = requests.get(svc.url + "/-/health", timeout=TIMEOUT).json()
    return next(v["status"] for v in body["volumes"] if v["volume"] == vol)


def copy_path(vol: NginxVolume, key: str, gen: str) -> Path:
    return vol.root / blob_rel(key, gen).lstrip("/")


def whole(svc, volumes: list[NginxVolume], keys: list[str]) -> list[str]:  # noqa: ANN001
    """Keys some recorded copy of which is missing or has other bytes than were PUT."""
    by_addr = {v.address: v for v in volumes}
    bad = []
    for key in keys:
        rec = index_record(svc, key)
        assert rec is not None
        for addr in rec.volumes:
            path = copy_path(by_addr[addr], key, rec.gen)
            if not path.is_file() or path.read_bytes() != body_for(key):
                bad.append(key)
                break
    return bad


def queue_len(svc) -> int:  # noqa: ANN001
    conn = apsw.Connection(svc.db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return schema.read_repair_stats(conn)[0]
    finally:
        conn.close()


def scrub_cli(svc, *args: str) -> subprocess.CompletedProcess:  # noqa: ANN001
    env = {k: v for k, v in os.environ.items() if not k.startswith("MKV_")} | {"MKV_CONFIG": ""}
    return subprocess.run(
        [sys.executable, "-m", "mkv.tools.scrub", "--volumes", ",".join(svc.volumes),
         "--db", svc.db, "--replicas", str(svc.replicas), "--volume-timeout", "5", *args],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env)


@pytest.fixture
def healing(make_volumes, make_service):  # noqa: ANN001, ANN201
    vols = make_volumes(3)
    # one worker: a /-/health answer and the GETs after it share one health cache
    svc = make_service(vols, replicas=2, workers=1, extra=FAST_HEALTH)
    for key in KEYS:
        assert put(svc, key, body_for(key)).status_code == 201
    # the health process gave every volume its marker and recorded it
    wait_for(lambda: all((v.root / identity.MARKER).is_file() for v in vols))
    return svc, vols


def test_every_disk_gets_a_marker_that_nginx_serves_and_rebuild_ignores(healing, tmp_path):
    svc, vols = healing
    for vol in vols:
        vid = identity.parse_marker((vol.root / identity.MARKER).read_bytes())
        served = requests.get(f"http://{vol.address}/{identity.MARKER}", timeout=TIMEOUT)
        assert served.status_code == 200 and identity.parse_marker(served.content) == vid
    # the listing of a disk's root shows the marker, and the scan takes only fan-out dirs
    listing = requests.get(f"http://{vol.address}/", timeout=TIMEOUT).json()
    assert identity.MARKER in {e["name"] for e in listing}
    assert identity.MARKER not in scan.top_dirs(listing)
    # and mkv-rebuild, reading every disk, finds exactly the keys and no problem
    out = run_cli(vols, tmp_path / "rebuilt.db", "--quiet", replicas=2)
    assert out.returncode == 0, out.stdout + out.stderr
    assert identity.MARKER not in out.stdout + out.stderr
    conn = apsw.Connection(str(tmp_path / "rebuilt.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert sorted(k for (k,) in conn.execute("SELECT key FROM keys")) == KEYS
    finally:
        conn.close()


@pytest.fixture
def slow_healing(make_volumes, make_service):  # noqa: ANN001, ANN201
    """`healing` with repair at 20 kB/s: the volume's 40-odd copies (2 kB each) take
    seconds, so the replaced state lasts long enough to be seen through /-/health."""
    vols = make_volumes(3)
    svc = make_service(vols, replicas=2, workers=1, extra=[*FAST_HEALTH, "--repair-rate", "20000"])
    for key in KEYS:
        assert put(svc, key, body_for(key)).status_code == 201
    wait_for(lambda: all((v.root / identity.MARKER).is_file() for v in vols))
    return svc, vols


def test_a_wiped_disk_is_replaced_read_around_and_repaired(slow_healing):
    svc, vols = slow_healing
    victim = vols[1]
    failures: list[tuple[float, str, int]] = []
    done = threading.Event()
    gets = [0]

    def load() -> None:
        i = 0
        while not done.is_set() and i < 20000:  # bounded
            key = KEYS[i % len(KEYS)]
            started = time.monotonic()
            try:
                r = CLIENT.get(kurl(svc, key), timeout=TIMEOUT)
                if r.status_code != 200 or r.content != body_for(key):
                    failures.append((started, key, r.status_code))
            except requests.RequestException:
                failures.append((started, key, -1))
            gets[0] += 1
            i += 1

    thread = threading.Thread(target=load)
    thread.start()
    try:
        # the new, empty disk under the running nginx (its work directory aside, which
        # lives on the data root only in this test's layout): a GET redirected there meets
        # a 404 and goes on to the next replica inside nginx
        for child in victim.root.iterdir():
            if child.name != ".nginx":
                shutil.rmtree(child) if child.is_dir() else child.unlink()

        def replaced() -> float | None:
            """/-/health shows the volume replaced"""
            return time.monotonic() if status_of(svc, victim.address) == "replaced" else None

        seen_replaced = wait_for(replaced, step=0.01)
        # and nginx restarted on it, as after a disk swap: reads no longer go there
        victim.stop()
        victim2 = NginxVolume.start(victim.root, victim.port)
        vols[1] = victim2
        wait_for(lambda: not whole(svc, vols, KEYS) and queue_len(svc) == 0)
        # adopted: a normal volume again once its keys are whole
        wait_for(lambda: status_of(svc, victim.address) == "up")
    finally:
        done.set()
        thread.join()
    late = [f for f in failures if f[0] > seen_replaced]
    early = Counter("refused" if f[2] == -1 else f[2] for f in failures if f[0] <= seen_replaced)
    print(f"{gets[0]} GETs (followed), {sum(early.values())} failed before the volume was "
          f"found replaced ({dict(early)}), {len(late)} after")
    assert gets[0] > 0
    assert failures == []  # before detection the volume's 404s fail over; after, reads avoid it
    # the new marker is the index's now
    vid = identity.parse_marker((victim.root / identity.MARKER).read_bytes())
    conn = apsw.Connection(svc.db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert schema.read_volume_ids(conn)[victim.address] == (vid, "")
    finally:
        conn.close()
    metrics = requests.get(svc.url + "/-/metrics", timeout=TIMEOUT).text
    assert f'mkv_volume_replaced{{volume="{victim.address}"}} 0.0' in metrics
    assert 'mkv_repair_queue{state="waiting"} 0.0' in metrics
    repaired = [line for line in metrics.splitlines()
                if line.startswith('mkv_repairs_total{outcome="repaired"}')]
    assert repaired and float(repaired[0].split()[-1]) >= 1


def test_scrub_mends_a_deleted_and_a_rotten_copy(healing):
    svc, vols = healing
    by_addr = {v.address: v for v in vols}
    lost_key, rotten_key = KEYS[3], KEYS[7]
    lost = index_record(svc, lost_key)
    rotten = index_record(svc, rotten_key)
    copy_path(by_addr[lost.volumes[0]], lost_key, lost.gen).unlink()
    path = copy_path(by_addr[rotten.volumes[1]], rotten_key, rotten.gen)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    out = scrub_cli(svc)
    assert out.returncode == 1, out.stderr
    assert f"{lost_key!r}: repaired" in out.stderr and f"{rotten_key!r}: repaired" in out.stderr
    assert "58 clean, 2 repaired, 0 with no good copy" in out.stderr
    assert whole(svc, vols, KEYS) == []
    for key in (lost_key, rotten_key):
        r = CLIENT.get(kurl(svc, key), timeout=TIMEOUT)
        assert r.status_code == 200 and r.content == body_for(key)
    again = scrub_cli(svc)
    assert again.returncode == 0, again.stderr
    assert "60 clean, 0 repaired" in again.stderr


def test_scrub_reports_a_key_with_no_good_copy_and_leaves_it_alone(healing):
    svc, vols = healing
    by_addr = {v.address: v for v in vols}
    key = KEYS[11]
    rec = index_record(svc, key)
    paths = [copy_path(by_addr[a], key, rec.gen) for a in rec.volumes]
    for p in paths:
        data = bytearray(p.read_bytes())
        data[0] ^= 0x01
        p.write_bytes(bytes(data))
    before = [p.read_bytes() for p in paths]
    out = scrub_cli(svc)
    assert out.returncode == 1, out.stderr
    assert f"{key!r}: lost: no good copy" in out.stderr
    assert "59 clean, 0 repaired, 1 with no good copy" in out.stderr
    assert [p.read_bytes() for p in paths] == before  # nothing deleted or rewritten
    assert index_record(svc, key) == rec


def test_scrub_without_repair_reports_and_changes_nothing(healing):
    svc, vols = healing
    by_addr = {v.address: v for v in vols}
    key = KEYS[5]
    rec = index_record(svc, key)
    path = copy_path(by_addr[rec.volumes[0]], key, rec.gen)
    path.unlink()
    out = scrub_cli(svc, "--no-repair")
    assert out.returncode == 1, out.stderr
    assert f"{key!r}: failed: bad copy on {rec.volumes[0]}" in out.stderr
    assert not path.exists()


def test_scrub_usage_errors_exit_2(healing):
    svc, _ = healing
    assert scrub_cli(svc, "--limit-rate", "-1").returncode == 2
    assert scrub_cli(svc, "--concurrency", "0").returncode == 2


def retrying(svc) -> int:  # noqa: ANN001
    conn = apsw.Connection(svc.db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return schema.read_repair_stats(conn)[1]
    finally:
        conn.close()


def test_repair_resumes_when_the_only_source_comes_back(healing):
    svc, vols = healing
    source, victim = vols[0], vols[1]
    source.stop()
    wait_for(lambda: status_of(svc, source.address) == "down")
    victim.stop()
    for child in victim.root.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    vols[1] = NginxVolume.start(victim.root, victim.port)
    wait_for(lambda: status_of(svc, victim.address) == "replaced")
    # the keys whose other copy is on the stopped volume cannot be mended: they stay queued
    wait_for(lambda: retrying(svc) > 0)
    shared = [k for k in KEYS if set(index_record(svc, k).volumes) == {source.address,
                                                                        victim.address}]
    assert shared and queue_len(svc) >= len(shared)
    assert status_of(svc, victim.address) == "replaced"  # not adopted while keys wait
    vols[0] = NginxVolume.start(source.root, source.port)
    wait_for(lambda: queue_len(svc) == 0 and not whole(svc, vols, KEYS), deadline_s=2 * WAIT)
    wait_for(lambda: status_of(svc, victim.address) == "up")


def test_the_background_scrub_mends_a_deleted_copy(make_volumes, make_service):
    vols = make_volumes(3)
    svc = make_service(vols, replicas=2, extra=[*FAST_HEALTH, "--scrub-interval", "0.5"])
    keys = KEYS[:10]
    for key in keys:
        assert put(svc, key, body_for(key)).status_code == 201
    by_addr = {v.address: v for v in vols}
    rec = index_record(svc, keys[4])
    path = copy_path(by_addr[rec.volumes[1]], keys[4], rec.gen)
    path.unlink()
    wait_for(lambda: path.is_file())
    assert whole(svc, vols, keys) == []
    metrics = requests.get(svc.url + "/-/metrics", timeout=TIMEOUT).text
    assert 'mkv_scrub_keys_total{outcome="repaired"} 1.0' in metrics


def test_another_disks_marker_makes_the_volume_replaced_until_its_keys_check_out(slow_healing):
    """A disk with another id (swapped in from elsewhere, here with the right blobs):
    replaced, every key checked, none copied (all clean), then its id adopted."""
    svc, vols = slow_healing
    vol = vols[2]
    # a client write holding one of its keys keeps the volume replaced until it ends
    held = next(k for k in KEYS if vol.address in index_record(svc, k).volumes)
    writer = WriterClient(svc.db + ".writer.sock", timeout=10)
    writer.lock(held)
    marker = vol.root / identity.MARKER
    old = identity.parse_marker(marker.read_bytes())
    marker.unlink()
    marker.write_bytes(identity.marker_body("another-disk"))
    try:
        wait_for(lambda: status_of(svc, vol.address) == "replaced")
        wait_for(lambda: queue_len(svc) == 1)  # the others checked out already
        assert status_of(svc, vol.address) == "replaced"
    finally:
        writer.release(held)
        writer.close()
    wait_for(lambda: status_of(svc, vol.address) == "up")
    conn = apsw.Connection(svc.db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert schema.read_volume_ids(conn)[vol.address] == ("another-disk", "")
    finally:
        conn.close()
    assert old != "another-disk" and marker.read_bytes() == identity.marker_body("another-disk")
    metrics = requests.get(svc.url + "/-/metrics", timeout=TIMEOUT).text
    assert 'mkv_repairs_total{outcome="repaired"} 0.0' in metrics
    clean = [line for line in metrics.splitlines()
             if line.startswith('mkv_repairs_total{outcome="clean"}')]
    assert clean and float(clean[0].split()[-1]) >= 1
    assert whole(svc, vols, KEYS) == []
