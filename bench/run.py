"""`make bench`: every workload beside its baseline, in one run, on this machine.

    python -m bench.run [--full] [--only get_hit,put_small,...]

Starts three nginx volumes, `mkv serve` (R=3) and a bare-WSGI baseline under mkv's own
gunicorn settings, measures, and writes bench/results/ (timestamped JSON, latest.json,
latest.md, latest.png). Quick mode takes about two minutes; --full runs longer and adds
value sizes. With --strict the exit status is 1 when a target is missed, for CI.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import floor, memory, report, workloads, wrk
from bench import writer as writer_bench
from bench.workloads import KIB, MIB, Cluster, Settings
from mkv.config import Config

STEPS = ("get_hit", "get_miss", "put_small", "writer_service", "big", "writer_direct", "memory",
         "floor")


def settings(full: bool, workers: int, threads: int) -> Settings:
    if full:
        return Settings(full=True, seconds=6, rounds=5, big_rounds=3, warmup=2, get_rounds=15,
                        get_seconds=3, workers=workers, threads=threads, put_sizes=(KIB, 64 * KIB),
                        big_sizes=(MIB, 4 * MIB, 16 * MIB), big_bytes_cap=8 << 30, memory_mib=1024)
    return Settings(full=False, seconds=2, rounds=5, big_rounds=3, warmup=1,
                    workers=workers, threads=threads)


def machine() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True,
                           env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin"})
    return {"cpus": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_start": os.getloadavg(),
            "nginx": nginx.stderr.strip(),
            "wrk": subprocess.run([wrk.ensure_wrk(), "-v"], capture_output=True,
                                  text=True).stdout.splitlines()[0].split(" [")[0]}


def step(name: str, fn: Callable[[], object]) -> object:
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    t = time.monotonic()
    out = fn()
    print(f"bench: {name} done in {time.monotonic() - t:.0f}s", file=sys.stderr, flush=True)
    return out


def run_steps(work: Path, s: Settings, only: set[str], res: dict) -> None:
    """The workloads chosen, in order; each result goes into `res` under its step name."""
    if only & {"get_hit", "get_miss", "put_small", "big", "writer_service"}:
        with Cluster(work / "cluster", s) as c:
            if "get_hit" in only:
                res["get_hit"] = step("GET existing key", lambda: workloads.get_hit(c, s))
            if "get_miss" in only:
                res["get_miss"] = step("GET missing key", lambda: workloads.get_miss(c, s))
            if "put_small" in only:
                res["put_small"] = [step(f"PUT {n} B", lambda n=n: workloads.put_small(c, s, n))
                                    for n in s.put_sizes]
            # small writes before the large values: the disk is still writing those back
            # for a while, which made the small-PUT figures a quarter of their rate
            if "writer_service" in only:
                res["writer_service"] = step("writer under concurrent PUTs",
                                             lambda: workloads.writer_under_puts(c, s))
            if "big" in only:
                res["big"] = [step(f"PUT+GET {n} B", lambda n=n: workloads.put_get_big(c, s, n))
                              for n in s.big_sizes]
            step("stop the cluster", c.close)
    if "writer_direct" in only:
        res["writer_direct"] = step("writer, 32 writers", lambda: writer_bench.measure(32, s.seconds))
    if "memory" in only:
        res["memory"] = step(f"RSS during a {s.memory_mib} MiB PUT",
                             lambda: memory.measure(s.memory_mib, work / "memory"))
    if "floor" in only:
        res["floor"] = step("mkv's own CPU, one thread", lambda: [
            {"what": what, "cpu_us": secs * 1e6}
            for what, secs in floor.run(2000, 40, work / "floor")])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="longer runs, more value sizes, 1 GiB RSS test")
    p.add_argument("--workers", type=int, default=Config(volumes=()).workers,
                   help="gunicorn workers for mkv and the baseline alike (default: mkv's)")
    p.add_argument("--threads", type=int, default=Config(volumes=()).threads,
                   help="threads per worker for mkv and the baseline alike (default: mkv's)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--only", default=",".join(STEPS), help="comma-separated subset of " + ", ".join(STEPS))
    args = p.parse_args()
    only = set(args.only.split(","))
    if unknown := only - set(STEPS):
        p.error(f"unknown step(s): {', '.join(sorted(unknown))}")
    if not report.have_matplotlib():
        print("bench: matplotlib is missing (pip install -e '.[bench]'): no chart this run",
              file=sys.stderr)
    s = settings(args.full, args.workers, args.threads)
    started = time.monotonic()
    res: dict = {"meta": {"mode": "full" if args.full else "quick",
                          "started": datetime.datetime.now().isoformat(timespec="seconds"),
                          **machine()},
                 "settings": {**vars(s), "wrk_threads": 1}}
    tmp = tempfile.TemporaryDirectory(prefix="mkv-bench-")
    try:
        run_steps(Path(tmp.name), s, only, res)
    finally:
        step("remove the data", tmp.cleanup)
    res["meta"]["seconds"] = round(time.monotonic() - started, 1)
    res["meta"]["loadavg_end"] = os.getloadavg()
    table, png = report.write(res)
    print(table)
    print(f"\n{res['meta']['mode']} run in {res['meta']['seconds']:.0f}s; results in "
          f"{report.RESULTS}/latest.json" + (f", chart {png}" if png else ""))
    return 1 if args.strict and any(r["passed"] is False for r in res["table"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
