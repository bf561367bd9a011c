"""Rebuild speed: N keys (default 100,000) with 3 replicas over 3 nginx volumes.

    python -m bench.rebuild [--keys 100000] [--concurrency 16] [--workdir DIR]

The data set is written straight onto the volume roots (blob + .key sidecar per replica,
placed by the ring exactly as `mkv serve` would), not through the service: that would take
far longer than the rebuild being measured. With --workdir the data set (and the volumes'
ports, which the ring depends on) is kept and reused by the next run.

Prints keys/s, where the wall time went (HTTP scan vs SQLite), the CPU the rebuild's Python
used against the CPU nginx used, and a one-line JSON result last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import apsw

from bench.workloads import group_cpu
from mkv.config import Config
from mkv.keys import key_hash, sidecar_body
from mkv.ring import Ring
from mkv.tools import rebuild
from tests.cluster import NginxVolume

MARKER = "bench-rebuild.json"
VALUE_MAX = 2048

_JOBS: list = []  # (root, [(hash, value offset, size, sidecar body)]) per volume, for fork workers
_DATA = b""


def make_keys(n: int, seed: int = 7) -> list[tuple[str, int, int]]:
    """(key, value offset, size): mostly plain keys, some unicode and '/'-rich ones."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 10
        if kind == 0:
            key = f"/bench/ünï/cødé/{i}"
        elif kind == 1:
            key = f"/bench/a/b/c/d/{i:07d}/e/f"
        else:
            key = f"/bench/{i:07d}"
        out.append((key, rnd.randrange(1 << 16), rnd.randint(1, VALUE_MAX)))
    return out


def _write_volume(job: int) -> int:
    root, files = _JOBS[job]
    made: set[str] = set()
    for h, off, size, sidecar in files:
        d = f"{root}/{h[0:2]}/{h[2:4]}"
        if d not in made:
            os.makedirs(d, exist_ok=True)
            made.add(d)
        with open(f"{d}/{h}", "wb") as f:
            f.write(_DATA[off:off + size])
        with open(f"{d}/{h}.key", "wb") as f:
            f.write(sidecar)
    return len(files)


def populate(roots: list[Path], addresses: list[str], n: int) -> dict[str, tuple]:
    """Write n keys x 3 replicas onto the roots; returns key -> (volumes, size, md5)."""
    global _DATA, _JOBS
    _DATA = random.Random(1).randbytes((1 << 16) + VALUE_MAX)
    ring = Ring(addresses)
    per_volume: dict[str, list] = {a: [] for a in addresses}
    expected = {}
    for key, off, size in make_keys(n):
        md5 = hashlib.md5(_DATA[off:off + size]).hexdigest()
        vols = ring.place(key, 3)
        body = sidecar_body(key, size, md5)
        h = key_hash(key)
        for v in vols:
            per_volume[v].append((h, off, size, body))
        expected[key] = (tuple(vols), size, md5)
    _JOBS = [(str(root), per_volume[a]) for root, a in zip(roots, addresses, strict=True)]
    with multiprocessing.get_context("fork").Pool(len(roots)) as pool:
        pool.map(_write_volume, range(len(roots)))
    return expected


def nginx_cpu(volumes: list[NginxVolume]) -> float:
    """CPU seconds (user + system) used so far by every nginx process of these volumes."""
    return group_cpu({v.proc.pid for v in volumes})


def run(keys: int, concurrency: int, workdir: Path) -> dict:
    marker = workdir / MARKER
    roots = [workdir / f"vol{i}" for i in range(3)]
    reuse = marker.exists() and json.loads(marker.read_text()).get("keys") == keys
    if not reuse:
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
        marker.unlink(missing_ok=True)
        ports = None
    else:
        ports = json.loads(marker.read_text())["ports"]
    vols = [NginxVolume.start(root, ports[i] if ports else None) for i, root in enumerate(roots)]
    try:
        addresses = [v.address for v in vols]
        t = time.monotonic()
        if reuse:
            ring = Ring(addresses)
            expected = {key: (tuple(ring.place(key, 3)), size, None)
                        for key, _, size in make_keys(keys)}
            print(f"reusing {keys} keys in {workdir}")
        else:
            expected = populate(roots, addresses, keys)
            marker.write_text(json.dumps({"keys": keys, "ports": [v.port for v in vols]}))
            print(f"wrote {keys} keys x 3 replicas onto the volumes in {time.monotonic() - t:.1f}s")

        db = str(workdir / "rebuilt.db")
        cfg = Config(volumes=tuple(addresses), replicas=3, db=db)
        cpu0, ng0 = time.process_time(), nginx_cpu(vols)
        result = rebuild.rebuild(cfg, db, force=True, concurrency=concurrency, progress=False)
        cpu, ng = time.process_time() - cpu0, nginx_cpu(vols) - ng0
        s = result.stats

        conn = apsw.Connection(db)
        count = conn.execute("SELECT count(*) FROM keys").fetchone()[0]
        wrong = 0
        for key, (vols_want, size, md5) in random.Random(3).sample(sorted(expected.items()), 1000):
            row = conn.execute("SELECT volumes, size, md5 FROM keys WHERE key=?", (key,)).fetchone()
            if row is None or row[0] != ",".join(vols_want) or row[1] != size or (
                    md5 is not None and row[2] != md5):
                wrong += 1
        conn.close()
    finally:
        for v in vols:
            v.stop()

    out = {
        "bench": "rebuild",
        "keys": keys,
        "volumes": 3,
        "replicas": 3,
        "concurrency": concurrency,
        "seconds": round(s.elapsed, 2),
        "keys_per_s": round(s.rate),
        "requests": s.requests,
        "requests_per_s": round(s.requests / s.elapsed),
        "http_scan_s": round(s.scan_s, 2),
        "sqlite_s": round(s.sqlite_s, 2),
        "after_scan_s": round(s.elapsed - s.scan_s, 2),
        "http_share": round(s.scan_s / s.elapsed, 3),
        "sqlite_share": round(s.sqlite_s / s.elapsed, 3),
        "python_cpu_s": round(cpu, 2),
        "nginx_cpu_s": round(ng, 2),
        "indexed": count,
        "sample_mismatches": wrong,
        "problems": result.report.total,
        "exit_code": result.exit_code,
    }
    print(f"rebuild: {keys} keys in {s.elapsed:.2f}s = {s.rate:,.0f} keys/s "
          f"({s.requests} GETs, {s.requests / s.elapsed:,.0f}/s, concurrency {concurrency})")
    print(f"  wall: HTTP scan (listings + sidecar reads) {s.scan_s:.2f}s = {out['http_share']:.0%}; "
          f"SQLite inserts {s.sqlite_s:.2f}s = {out['sqlite_share']:.0%}, on the main thread while "
          f"the scan runs; {out['after_scan_s']:.2f}s after the scan (last batch, WAL, fsync, rename)")
    print(f"  CPU: rebuild's Python {cpu:.2f}s, nginx {ng:.2f}s (2 cores)")
    print(f"  index: {count} keys, {wrong} of 1000 sampled records wrong, "
          f"{result.report.total} problems, exit {result.exit_code}")
    print(json.dumps(out))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=rebuild.DEFAULT_CONCURRENCY)
    ap.add_argument("--workdir", help="keep the data set here and reuse it on the next run")
    args = ap.parse_args()
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        out = run(args.keys, args.concurrency, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="mkv-bench-rebuild-") as tmp:
            out = run(args.keys, args.concurrency, Path(tmp))
    return 0 if out["indexed"] == args.keys and not out["sample_mismatches"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
