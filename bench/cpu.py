"""CPU per request of each process, mkv's and nginx's, while wrk drives one workload.

    python -m bench.cpu put|get|miss [--seconds 5] [--connections 32] [--value-bytes 1024]

Starts three nginx volumes and `mkv serve` (R=3), warms up, then reads every process's
user+system CPU from /proc before and after a wrk run and prints it per request, largest
first. Where `make bench` gives one figure for all of mkv, this says which process spends
it: the workers, the writer, the health process or the volumes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import requests

from bench import wrk
from tests.cluster import NginxVolume
from tests.service import MkvService

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def ours() -> dict[int, str]:
    """The mkv and nginx processes now running, by pid: their command lines."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "mkv" in cmd or cmd.startswith("nginx"):
            out[int(proc.name)] = cmd.strip()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload", choices=("put", "get", "miss"))
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--value-bytes", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mkv-bench-cpu-") as d:
        vols = [NginxVolume.start(Path(d) / f"vol{i}") for i in range(3)]
        svc = MkvService(Path(d) / "svc", [v.address for v in vols], replicas=3,
                         workers=args.workers, extra=["--threads", str(args.threads)])
        try:
            svc.start()
            script, env, url = "", {}, svc.url + "/missing/key"
            if args.workload == "put":
                script, url = wrk.PUT_SCRIPT, svc.url
                env = {"WRK_BODY_BYTES": str(args.value_bytes), "WRK_PREFIX": "/bench/cpu/"}
            elif args.workload == "get":
                requests.put(svc.url + "/bench/hit", data=b"h" * args.value_bytes).raise_for_status()
                url = svc.url + "/bench/hit"
            wrk.run(url, 1, args.connections, script, {**env, "WRK_PREFIX": "/bench/warm/"}
                    if script else env)
            procs = ours()
            before = {pid: cpu_seconds(pid) for pid in procs}
            result = wrk.run(url, args.seconds, args.connections, script, env)
            spent = {pid: cpu_seconds(pid) - before[pid] for pid in procs}
        finally:
            svc.stop()
            for v in vols:
                v.stop()
    n = max(result.requests, 1)
    print(f"{args.workload}: {result.requests} requests in {args.seconds:.0f}s "
          f"({result.requests / args.seconds:,.0f}/s); CPU per request by process:")
    for pid, secs in sorted(spent.items(), key=lambda kv: -kv[1]):
        if secs > 0:
            print(f"  {secs / n * 1e6:8.1f} us  {procs[pid][:100]}")
    print(f"  {sum(spent.values()) / n * 1e6:8.1f} us  in all")


if __name__ == "__main__":
    main()
