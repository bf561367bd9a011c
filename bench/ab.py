"""A/B of the GET path between two source trees of mkv, in one run on one machine.

    .venv/bin/python -m bench.ab --a /tmp/mkv-before --b . [--rounds 12] [--seconds 2]

Both services run at once over the same three nginx volumes (a GET never reaches a
volume: it is a 302), each from its own tree (`python -m mkv serve` with that tree first
on the path) with the same settings and its own index holding one key. wrk then GETs
the key from each in interleaved rounds, alternating which goes first, and the CPU
their process groups spent per request is read from /proc (bench.workloads.group_cpu),
the steadier figure on a shared machine. Used to price one change to the read path,
e.g. a tree from `git archive <commit> | tar -x -C /tmp/mkv-before` against the checkout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench import wrk
from bench.workloads import group_cpu, stop_group
from tests.cluster import NginxVolume, free_port


class TreeService:
    """`mkv serve` from one source tree, in its own session."""

    def __init__(self, tree: Path, work: Path, volumes: list[str], workers: int) -> None:
        self.port = free_port()
        work.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env["PYTHONPATH"] = str(tree)
        self.log = (work / "serve.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mkv", "serve", "--bind", "127.0.0.1", "--port", str(self.port),
             "--volumes", ",".join(volumes), "--db", str(work / "index.db"),
             "--workers", str(workers)],
            cwd=tree, env=env, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(self.url + "/-/health", timeout=2)
                break
            except requests.RequestException:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mkv serve from {tree} did not start: see {work}/serve.log") \
                        from None
                time.sleep(0.1)
        requests.put(self.url + "/bench/ab", data=b"v" * 1024, timeout=10).raise_for_status()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_group(self.proc, 30, linger=10)
        self.log.close()


def measure(svc: TreeService, seconds: float, connections: int) -> dict:
    before = group_cpu({svc.proc.pid})
    r = wrk.run(svc.url + "/bench/ab", seconds, connections)
    if r.status_errors or r.socket_errors:
        raise RuntimeError(f"wrk {svc.url}: {r.status_errors} bad statuses, "
                           f"{r.socket_errors} socket errors")
    return {"rps": r.rps, "cpu_us": (group_cpu({svc.proc.pid}) - before) / r.requests * 1e6}


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--a", required=True, type=Path, help="source tree A (the reference)")
    p.add_argument("--b", required=True, type=Path, help="source tree B")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mkv-ab-") as tmp:
        work = Path(tmp)
        volumes = [NginxVolume.start(work / f"vol{i}") for i in range(3)]
        services: dict[str, TreeService] = {}
        try:
            for name, tree in (("a", args.a), ("b", args.b)):
                services[name] = TreeService(tree.resolve(), work / name,
                                             [v.address for v in volumes], args.workers)
            for svc in services.values():
                measure(svc, 2, args.connections)  # warm-up
            runs: dict[str, list[dict]] = {"a": [], "b": []}
            for i in range(args.rounds):
                for name in ("ab" if i % 2 == 0 else "ba"):
                    runs[name].append(measure(services[name], args.seconds, args.connections))
        finally:
            for svc in services.values():
                svc.stop()
            for v in volumes:
                v.stop()
    for name in ("a", "b"):
        rps = statistics.median(r["rps"] for r in runs[name])
        cpu = statistics.median(r["cpu_us"] for r in runs[name])
        print(f"{name}: {getattr(args, name)}: median {rps:,.0f} req/s, "
              f"{cpu:.1f} us server CPU per GET")
    rps_ratio = statistics.median(b["rps"] / a["rps"] for a, b in zip(runs["a"], runs["b"], strict=True))
    cpu_ratio = statistics.median(b["cpu_us"] / a["cpu_us"]
                                  for a, b in zip(runs["a"], runs["b"], strict=True))
    print(f"b/a per round, median: rate {rps_ratio:.3f}, CPU per GET {cpu_ratio:.3f} "
          f"({args.rounds} rounds of {args.seconds:g} s, {args.connections} connections)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
