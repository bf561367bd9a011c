"""Where mkv's time goes under a workload: py-spy on every mkv process while wrk loads it.

    python -m bench.profile get|miss|put [--seconds 10] [--value-bytes N] [--svg] [--mode gil|active|idle]

Starts the bench cluster, drives it with wrk (one thread, like the bench), records all
of mkv serve's processes (master, workers, writer, health) with `py-spy record
--subprocesses`, and prints the functions with the most samples, by own time and
including callees. The raw stacks are kept in bench/results/profile-<workload>.txt
(and a flame graph in profile-<workload>.svg with --svg) for a closer look.
py-spy must be installed: `pip install py-spy` (it is in the `bench` extra).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench import wrk
from bench.report import RESULTS
from bench.workloads import KIB, Cluster, Settings
from mkv.config import Config

TARGETS = {"get": "/bench/hit", "miss": "/missing/key", "put": ""}


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return found


def record(pid: int, seconds: int, out: Path, fmt: str, mode: str) -> None:
    """Sample without pausing the processes (--nonblocking), so the load is not disturbed."""
    cmd = [py_spy(), "record", "--pid", str(pid), "--subprocesses", "--duration", str(seconds),
           "--rate", "200", "--format", fmt, "--output", str(out), "--nonblocking"]
    extra = {"gil": ["--gil"], "idle": ["--idle"], "active": []}[mode]
    subprocess.run(cmd + extra, check=True, capture_output=True)


def module(frame: str) -> str:
    """`f (urllib3/connection.py:630)` -> `urllib3`; mkv's own files are kept apart."""
    path = frame.rpartition(" (")[2].split(":")[0]
    if path.startswith("mkv/"):
        return path
    return path.split("/")[0].removesuffix(".py").lstrip("<").rstrip(">") or frame


def summarize(raw: Path, top: int = 25) -> str:
    """Sample shares by module and by function (own and inclusive), from py-spy's
    collapsed stacks. The module of a sample is that of its innermost frame."""
    modules: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    per_process: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        count = int(n)
        frames = stack.split(";")
        total += count
        procs = [f for f in frames if f.startswith("process ")]
        per_process[procs[-1][:60] if procs else "?"] += count
        own[frames[-1]] += count
        modules[module(frames[-1])] += count
        for f in set(frames):
            if not f.startswith("process "):
                incl[f] += count
    lines = [f"{total} samples", "", "by process:"]
    lines += [f"  {n / total:6.1%}  {p}" for p, n in per_process.most_common(8)]
    lines += ["", "by module:"] + [f"  {n / total:6.1%}  {m}" for m, n in modules.most_common(12)]
    lines += ["", "own time:"] + [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    lines += ["", "including callees:"] + [f"  {n / total:6.1%}  {f}" for f, n in incl.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload", choices=sorted(TARGETS))
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--value-bytes", type=int, default=KIB, help="value size for put")
    p.add_argument("--workers", type=int, default=Config(volumes=()).workers)
    p.add_argument("--threads", type=int, default=Config(volumes=()).threads)
    p.add_argument("--svg", action="store_true", help="also record a flame graph (a second run)")
    p.add_argument("--mode", choices=("gil", "active", "idle"), default="gil",
                   help="gil: only the thread holding the GIL (where Python CPU goes; the "
                        "default), active: every running thread, idle: waiting threads too")
    args = p.parse_args()
    s = Settings(full=False, seconds=args.seconds, rounds=1, big_rounds=1, warmup=1,
                 workers=args.workers, threads=args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mkv-profile-") as tmp, Cluster(Path(tmp), s) as c:
        requests.put(c.svc.url + "/bench/hit", data=b"h" * KIB).raise_for_status()
        assert c.svc.proc is not None
        pid = c.svc.proc.pid
        runs = [("txt", "raw")] + ([("svg", "flamegraph")] if args.svg else [])
        for n, (ext, fmt) in enumerate(runs):
            script, env = "", {}
            if args.workload == "put":
                script = wrk.PUT_SCRIPT
                env = {"WRK_BODY_BYTES": str(args.value_bytes), "WRK_PREFIX": f"/bench/profile{n}/"}
            with ThreadPoolExecutor(1) as pool:
                load = pool.submit(wrk.run, c.svc.url + TARGETS[args.workload], args.seconds + 2,
                                   args.connections, script, env)
                out = RESULTS / f"profile-{args.workload}.{ext}"
                time.sleep(1)  # let wrk connect and the workers warm up
                record(pid, args.seconds, out, fmt, args.mode)
                print(f"{args.workload}: {load.result().rps:,.0f} req/s under py-spy; wrote {out}")
    print(summarize(RESULTS / f"profile-{args.workload}.txt"))


if __name__ == "__main__":
    main()
