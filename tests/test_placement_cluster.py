"""Placement by weight and host on a live cluster: four nginx volumes on two "hosts"
(the loopback addresses 127.0.0.2 and 127.0.0.3, two ports each) under `mkv serve`
(docs/design.md, "Placement")."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from mkv import config
from mkv.ring import address_host
from tests.cluster import NginxVolume
from tests.helpers import REPO, TIMEOUT, blob_rel, body_for, index_record, kurl, wait_for
from tests.service import FileService

HOSTS = ("127.0.0.2", "127.0.0.3")
KEYS = [f"/placed/{i:04d}" for i in range(600)]


def size_of(key: str) -> int:
    return 500 + int(key.rsplit("/", 1)[1]) % 7 * 300


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[list[NginxVolume]]:
    """a1, a2 on 127.0.0.2 and b1, b2 on 127.0.0.3."""
    started: list[NginxVolume] = []
    try:
        for host in HOSTS:
            for disk in (1, 2):
                started.append(NginxVolume.start(tmp_path / f"{host}-{disk}", host=host))
        yield started
    finally:
        for vol in started:
            vol.stop()


def entries(vols: list[NginxVolume], weights: list[float]) -> str:
    return ",".join(f"{v.address};weight={w:g}" for v, w in zip(vols, weights, strict=True))


def ring_of(volumes: str, replicas: int):
    ns = config.parse(config.build_parser("mkv", ""),
                      ["--volumes", volumes, "--replicas", str(replicas), "--db", "i.db"], env={})
    return config.validate(ns).ring()


def holders(vols: list[NginxVolume], key: str) -> list[str]:
    """The volumes whose disk has the key's blob (any generation)."""
    rel = Path(blob_rel(key).lstrip("/"))
    return [v.address for v in vols if (v.root / rel.parent).is_dir()
            and any(p.name.split(".")[0] == rel.name and not p.name.endswith(".key")
                    for p in (v.root / rel.parent).iterdir())]


def rebalance(volumes: str, db: str, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MKV_")} | {"MKV_CONFIG": ""}
    return subprocess.run([sys.executable, "-m", "mkv.tools.rebalance", "--volumes", volumes,
                           "--db", db, "--replicas", "2", "--quiet", *extra],
                          capture_output=True, text=True, timeout=180, cwd=REPO, env=env)


def shares_within_hosts(vols: list[NginxVolume], placed: dict[str, list[str]]) -> dict[str, float]:
    """Each volume's fraction of its host's copies."""
    copies = Counter(v for vs in placed.values() for v in vs)
    per_host = Counter()
    for vol, n in copies.items():
        per_host[address_host(vol)] += n
    return {v.address: copies[v.address] / per_host[v.host] for v in vols}


def test_copies_never_share_a_host_and_follow_a_changed_weight(
        two_hosts: list[NginxVolume], file_service: Callable[..., FileService]) -> None:
    vols = two_hosts
    before = entries(vols, [2, 1, 1, 1])
    svc = file_service([before], replicas=2)

    # /-/health says how placement sees every volume
    health = {v["volume"]: v for v in svc.health()["volumes"]}
    assert [(health[v.address]["weight"], health[v.address]["host"], health[v.address]["zone"])
            for v in vols] == [(2.0, HOSTS[0], None), (1.0, HOSTS[0], None),
                               (1.0, HOSTS[1], None), (1.0, HOSTS[1], None)]
    assert sum(v["share"] for v in health.values()) == pytest.approx(1.0, abs=1e-3)
    assert health[vols[0].address]["share"] == pytest.approx(0.5 * 2 / 3, abs=0.03)
    # the health process gets plain addresses, whatever the entries carry
    (health_pid,) = svc.pids("mkv.health")
    argv = Path(f"/proc/{health_pid}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"--volumes") + 1].decode() == ",".join(v.address for v in vols)

    def put(key: str) -> None:
        r = requests.put(kurl(svc, key), data=body_for(key, size_of(key)), timeout=TIMEOUT)
        assert r.status_code == 201, (key, r.status_code, r.text)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, KEYS))
    ring = ring_of(before, 2)
    for key in KEYS:
        on = holders(vols, key)
        assert sorted(on) == sorted(index_record(svc, key).volumes) == sorted(ring.place(key, 2))
        assert {address_host(v) for v in on} == set(HOSTS), (key, on)  # one copy per host
    placed = {k: list(index_record(svc, k).volumes) for k in KEYS}
    within = shares_within_hosts(vols, placed)
    assert within[vols[0].address] == pytest.approx(2 / 3, abs=0.07), within
    assert within[vols[2].address] == pytest.approx(1 / 2, abs=0.07), within

    # b2's disk is replaced by one four times the size: a new weight, by SIGHUP
    after = entries(vols, [2, 1, 1, 4])
    svc.write_conf(volumes=after)
    svc.hup()
    wait_for(lambda: {v["volume"]: v["weight"] for v in svc.health()["volumes"]}
             .get(vols[3].address) == 4.0, 20, "/-/health shows the new weight")

    dry = rebalance(after, svc.db, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    m = re.search(r"(\d+) to move, (\d+) copies \((\d+) bytes", dry.stdout)
    assert m, dry.stdout
    to_move, copies, nbytes = map(int, m.groups())
    per_volume = dict(re.findall(r"^  (\S+): (\d+) bytes, [\d.]+ MB to copy onto it", dry.stdout,
                                 re.M))
    # a key whose two volumes only swap order is re-recorded, nothing copied
    assert 0 < copies <= to_move < len(KEYS)
    assert set(per_volume) == {vols[3].address, vols[2].address}  # only host b changes
    assert int(per_volume[vols[3].address]) == nbytes  # everything moves onto b2

    run = rebalance(after, svc.db)
    assert run.returncode == 0, run.stderr
    assert f"copies {copies}," in run.stderr and f"deletions {copies}," in run.stderr, run.stderr

    ring = ring_of(after, 2)
    placed = {}
    for key in KEYS:
        rec = index_record(svc, key)
        on = holders(vols, key)
        assert list(rec.volumes) == ring.place(key, 2) and sorted(on) == sorted(rec.volumes)
        assert {address_host(v) for v in on} == set(HOSTS), (key, on)
        placed[key] = list(rec.volumes)
    within = shares_within_hosts(vols, placed)
    assert within[vols[3].address] == pytest.approx(4 / 5, abs=0.07), within
    assert within[vols[0].address] == pytest.approx(2 / 3, abs=0.07), within
    health = {v["volume"]: v for v in svc.health()["volumes"]}
    assert health[vols[3].address]["share"] == pytest.approx(0.5 * 4 / 5, abs=0.03)

    def read(key: str) -> None:
        r = requests.get(kurl(svc, key), timeout=TIMEOUT)
        assert r.status_code == 200 and r.content == body_for(key, size_of(key)), key
        head = requests.head(kurl(svc, key), allow_redirects=False, timeout=TIMEOUT)
        assert head.headers["Key-Balance"] == "balanced", key

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(read, KEYS))
    print(f"\n2 hosts x 2 volumes, R=2: moved {copies} of {2 * len(KEYS)} copies "
          f"({nbytes} bytes) for b2's weight 1 -> 4; b2 holds {within[vols[3].address]:.1%} "
          f"of host b's copies (weight says 80 %), a1 {within[vols[0].address]:.1%} of "
          "host a's (67 %)")
