"""Peak RSS of every mkv process during one large PUT, against its idle RSS.

    python -m bench.memory [--mib 1024] [--chunked]

Starts three nginx volumes and `mkv serve` in a temporary directory, samples
the RSS of every process of the service (master, workers, writer, health) every
20 ms while a value streams through, and prints idle, peak and growth per process.
`--chunked` sends the value without a Content-Length (Transfer-Encoding: chunked).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from tests.cluster import NginxVolume
from tests.service import MkvService


class PatternBody:
    """A file-like body of `size` bytes made on the fly, so the client holds no value."""

    def __init__(self, size: int) -> None:
        self.len = size
        self._left = size
        self._chunk = b"\xa5" * (1 << 20)

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        out = self._chunk[:n] if n <= len(self._chunk) else b"\xa5" * n
        self._left -= len(out)
        return out


def pattern_chunks(size: int) -> Iterator[bytes]:
    """The same bytes as PatternBody, as a generator: requests sends it chunked."""
    chunk = b"\xa5" * (1 << 20)
    for start in range(0, size, len(chunk)):
        yield chunk[:size - start]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def role(pid: int, master: int) -> str:
    """What a process of `mkv serve`'s group is, from its command line."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    if b"mkv.writer" in cmdline:
        return "writer"
    if b"mkv.health" in cmdline:
        return "health"
    return "master" if pid == master else "worker"


def measure(mib: int, workdir: Path, chunked: bool = False) -> dict:
    vols = [NginxVolume.start(workdir / f"vol{i}") for i in range(3)]
    svc = MkvService(workdir / "svc", [v.address for v in vols], workers=2)
    try:
        svc.start()
        # warm every worker up (imports, pools) so "idle" is the steady state
        for i in range(20):
            requests.put(f"{svc.url}/warm{i}", data=b"x" * 1000).raise_for_status()
        assert svc.proc is not None
        pids = {pid: role(pid, svc.proc.pid) for pid in svc.pids("")}
        idle = {pid: rss_kib(pid) for pid in pids}
        peak = dict(idle)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for pid in pids:
                    try:
                        peak[pid] = max(peak[pid], rss_kib(pid))
                    except OSError:
                        pass
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        body = pattern_chunks(mib << 20) if chunked else PatternBody(mib << 20)
        resp = requests.put(f"{svc.url}/big", data=body)
        elapsed = time.monotonic() - started
        done.set()
        sampler.join()
        if resp.status_code != 201:
            raise RuntimeError(f"PUT answered {resp.status_code}: {resp.text}\n{svc.output()[-2000:]}")
        rows = [{"pid": pid, "process": pids[pid],
                 "idle_mib": idle[pid] / 1024, "peak_mib": peak[pid] / 1024,
                 "growth_mib": (peak[pid] - idle[pid]) / 1024} for pid in pids]
        return {"value_mib": mib, "chunked": chunked, "seconds": elapsed,
                "mb_per_s": mib * 1.048576 / elapsed,
                "processes": rows, "max_growth_mib": max(r["growth_mib"] for r in rows)}
    finally:
        svc.stop()
        for v in vols:
            v.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--chunked", action="store_true", help="send without a Content-Length")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mkv-bench-mem-") as d:
        result = measure(args.mib, Path(d), args.chunked)
    for row in result["processes"]:
        print(f"{row['process']:9} pid {row['pid']:>7}  idle {row['idle_mib']:7.1f} MiB  "
              f"peak {row['peak_mib']:7.1f} MiB  growth {row['growth_mib']:6.1f} MiB")
    how = " (chunked)" if args.chunked else ""
    print(f"PUT{how} of {args.mib} MiB in {result['seconds']:.1f} s ({result['mb_per_s']:.0f} MB/s); "
          f"largest growth {result['max_growth_mib']:.1f} MiB (limit 64)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
