"""Rebalance throughput when a volume is added, against plain HTTP copies.

    python -m bench.rebalance [--keys 48] [--mib 4] [--concurrency 4]

Puts `--keys` values of `--mib` MiB through a real `mkv serve` on three volumes, stops
it, adds a fourth volume and times `mkv-rebalance` (a subprocess, its peak RSS sampled
from /proc). Baseline in the same run: the same number of copies of the same blobs,
each a plain streamed GET from one of the same nginx servers and PUT to another, with
the same concurrency. Prints MB/s for both, the ratio (target >= 0.8) and the RSS
(target < 100 MiB), and one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--keys", type=int, default=48)
    p.add_argument("--mib", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args()
    size = args.mib << 20
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
            elapsed, peak, stats = run_rebalance(svc.db, [v.address for v in vols], args.concurrency)
            copied = stats["copies"] * size
            # the baseline copies the same number of blobs, of the same size, between the
            # same servers: from each old volume in turn to the new one
            holders = [(v.address, blob_path(k)) for k in keys for v in vols[:3]
                       if (v.root / blob_path(k)[1:]).exists()]
            pairs = [(src, vols[3].address, path)
                     for src, path in (holders * stats["copies"])[:stats["copies"]]]
            base = plain_copies(pairs, size, args.concurrency)
        finally:
            for v in vols:
                v.stop()
    mkv_rate, base_rate = copied / elapsed / 1e6, copied / base / 1e6
    print(f"rebalance: {stats['copies']} copies of {args.mib} MiB in {elapsed:.1f}s = "
          f"{mkv_rate:.0f} MB/s (includes checks, index updates and {stats['deletions']} deletions)")
    print(f"plain GET+PUT of the same bytes: {base:.1f}s = {base_rate:.0f} MB/s")
    print(f"ratio {mkv_rate / base_rate:.2f} (target >= 0.8); rebalancer peak RSS {peak:.0f} MiB "
          f"(target < 100)")
    print(json.dumps({"copies": stats["copies"], "value_mib": args.mib, "seconds": elapsed,
                      "mb_per_s": mkv_rate, "baseline_seconds": base, "baseline_mb_per_s": base_rate,
                      "ratio": mkv_rate / base_rate, "peak_rss_mib": peak}))


if __name__ == "__main__":
    main()
