"""Rebalance throughput when a volume is added, against plain HTTP copies.

    python -m bench.rebalance [--keys 300] [--mib 4] [--concurrency 4] [--rounds 4]

Puts `--keys` values of `--mib` MiB through a real `mkv serve` (R=3) on three volumes,
stops it, then alternately adds a fourth volume and drains it again, timing each
`mkv-rebalance` (a subprocess, start to exit, its peak RSS sampled from /proc). After
each round, the baseline: the same number of copies of the same blobs, each a plain
streamed GET from one of the same nginx servers and PUT to another, with the same
concurrency. Prints MB/s for both per round, the median ratio (target >= 0.8) and the
peak RSS (target < 100 MiB), and one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import urllib3

from mkv.keys import blob_path
from tests.cluster import NginxVolume
from tests.service import MkvService


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_rebalance(db: str, volumes: list[str], concurrency: int) -> tuple[float, float, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mkv.tools.rebalance", "--volumes", ",".join(volumes), "--db", db,
         "--concurrency", str(concurrency)], stderr=subprocess.PIPE, text=True)
    peak = 0.0
    started = time.monotonic()
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            peak = max(peak, rss_mib(proc.pid))
        except OSError:
            pass
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    reader.join()
    if proc.returncode != 0:
        raise RuntimeError("rebalance failed:\n" + "".join(lines))
    done = [ln for ln in lines if "done:" in ln][-1]
    stats = {k: int(v) for k, v in re.findall(r"(moved|copies|deletions) (\d+)", done)}
    return elapsed, peak, stats


def plain_copies(pairs: list[tuple[str, str, str]], size: int, concurrency: int) -> float:
    """GET each blob from its source and PUT it to a scratch path on the destination."""
    http = urllib3.PoolManager(maxsize=concurrency * 2, retries=False)

    def copy(pair: tuple[str, str, str]) -> None:
        src, dst, path = pair
        resp = http.request("GET", f"http://{src}{path}", preload_content=False)
        put = http.request("PUT", f"http://{dst}/plain{path}", body=resp.stream(1 << 20),
                           headers={"Content-Length": str(size)})
        resp.release_conn()
        assert put.status in (201, 204), put.status

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(copy, pairs))
    return time.monotonic() - started


def one_round(db: str, vols: list[NginxVolume], keys: list[str], size: int, adding: bool,
              concurrency: int) -> dict:
    """Rebalance onto all four volumes (adding) or back onto the first three (draining
    the fourth), then the same number of plain copies between the same servers."""
    config = vols if adding else vols[:3]
    elapsed, peak, stats = run_rebalance(db, [v.address for v in config], concurrency)
    # the baseline copies the same number of blobs, of the same size, from the volumes
    # that hold them to the volume the round copied to most (the fourth, or on draining
    # the first three in turn)
    holders = [(v.address, blob_path(k)) for k in keys for v in vols
               if (v.root / blob_path(k)[1:]).exists()]
    targets = [vols[3].address] if adding else [v.address for v in vols[:3]]
    pairs = [(src, targets[i % len(targets)], path)
             for i, (src, path) in enumerate((holders * stats["copies"])[:stats["copies"]])]
    base = plain_copies(pairs, size, concurrency)
    copied = stats["copies"] * size
    return {"round": "add a volume" if adding else "drain it", "copies": stats["copies"],
            "deletions": stats["deletions"], "seconds": elapsed, "baseline_seconds": base,
            "mb_per_s": copied / elapsed / 1e6, "baseline_mb_per_s": copied / base / 1e6,
            "ratio": base / elapsed, "peak_rss_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--keys", type=int, default=300)
    p.add_argument("--mib", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4, help="alternately add and drain a volume")
    args = p.parse_args()
    size = args.mib << 20
    rounds = []
    with tempfile.TemporaryDirectory(prefix="mkv-bench-rebalance-") as d:
        vols = [NginxVolume.start(Path(d) / f"vol{i}") for i in range(4)]
        try:
            svc = MkvService(Path(d) / "svc", [v.address for v in vols[:3]], replicas=3)
            svc.start()
            value = os.urandom(size)
            keys = [f"/bench/rebalance/{i}" for i in range(args.keys)]
            with ThreadPoolExecutor(4) as pool:
                codes = list(pool.map(lambda k: requests.put(svc.url + k, data=value).status_code,
                                      keys))
            assert set(codes) == {201}, codes
            svc.stop()
            for i in range(args.rounds):
                r = one_round(svc.db, vols, keys, size, adding=i % 2 == 0,
                              concurrency=args.concurrency)
                rounds.append(r)
                print(f"{r['round']}: {r['copies']} copies of {args.mib} MiB in {r['seconds']:.2f}s = "
                      f"{r['mb_per_s']:.0f} MB/s (with checks, index updates and {r['deletions']} "
                      f"deletions); plain GET+PUT {r['baseline_seconds']:.2f}s = "
                      f"{r['baseline_mb_per_s']:.0f} MB/s; ratio {r['ratio']:.2f}; "
                      f"RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        finally:
            for v in vols:
                v.stop()
    ratio = statistics.median(r["ratio"] for r in rounds)
    peak = max(r["peak_rss_mib"] for r in rounds)
    print(f"median ratio {ratio:.2f} over {len(rounds)} rounds (target >= 0.8); "
          f"rebalancer peak RSS {peak:.0f} MiB (target < 100)")
    print(json.dumps({"value_mib": args.mib, "keys": args.keys, "concurrency": args.concurrency,
                      "ratio": ratio, "peak_rss_mib": peak, "rounds": rounds}))


if __name__ == "__main__":
    main()
