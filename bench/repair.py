"""Repair throughput against its `repair-rate` setting.

    python -m bench.repair [--keys 120] [--kib 512] [--rates 2e6,8e6]

For each rate: three volumes, a real `mkv serve` (R=2) with `--repair-rate RATE`, `--keys`
values of `--kib` KiB; then one volume's disk is wiped and nginx restarted on it, and the
repair process mends every copy it lost. /-/metrics' mkv_repair_bytes_total is sampled
every 0.25 s; the measured rate is the bytes copied between the first and the last
sample that moved, over that time. Prints measured bytes/s against the setting and one
line of JSON. Not a test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import requests

from tests.cluster import NginxVolume
from tests.helpers import FAST_HEALTH, body_for, put
from tests.service import MkvService


def repaired_bytes(svc: MkvService) -> float:
    for line in requests.get(svc.url + "/-/metrics", timeout=10).text.splitlines():
        if line.startswith("mkv_repair_bytes_total "):
            return float(line.split()[-1])
    return 0.0


def one(rate: float, keys: int, kib: int, base: Path) -> dict:
    vols = [NginxVolume.start(base / f"vol{i}") for i in range(3)]
    svc = MkvService(base / "svc", [v.address for v in vols], replicas=2,
                     extra=[*FAST_HEALTH, "--repair-rate", str(rate)]).start()
    try:
        for i in range(keys):
            key = f"/bench/{i}"
            assert put(svc, key, body_for(key, kib * 1024)).status_code == 201
        victim = vols[1]
        victim.stop()
        for child in victim.root.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        vols[1] = NginxVolume.start(victim.root, victim.port)
        samples: list[tuple[float, float]] = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            samples.append((time.monotonic(), repaired_bytes(svc)))
            moving = [s for a, s in zip(samples, samples[1:], strict=False) if s[1] > a[1]]
            if moving and len(samples) > 8 and samples[-1][1] == samples[-8][1]:
                break  # no progress for 2 s after some: done
            time.sleep(0.25)
        moved = [s for a, s in zip(samples, samples[1:], strict=False) if s[1] > a[1]]
        first = next(a for a, s in zip(samples, samples[1:], strict=False) if s[1] > a[1])
        last = moved[-1]
        measured = (last[1] - first[1]) / (last[0] - first[0])
        return {"setting": rate, "measured": round(measured), "bytes": last[1],
                "seconds": round(last[0] - first[0], 2), "ratio": round(measured / rate, 3)}
    finally:
        svc.stop()
        for v in vols:
            v.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=120)
    p.add_argument("--kib", type=int, default=512)
    p.add_argument("--rates", default="2e6,8e6")
    args = p.parse_args()
    results = []
    for rate in (float(r) for r in args.rates.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            r = one(rate, args.keys, args.kib, Path(tmp))
        print(f"repair-rate {rate:,.0f} B/s: measured {r['measured']:,} B/s "
              f"({r['ratio']:.2f} of the setting) over {r['seconds']} s, {r['bytes']:,.0f} bytes")
        results.append(r)
    print(json.dumps({"bench": "repair", "results": results}))


if __name__ == "__main__":
    main()
