"""Group commit under concurrent writers: commits per second and keys per commit.

    python -m bench.writer [--writers 32] [--seconds 5] [--synchronous NORMAL]

Runs the real writer process (`python -m mkv.writer`) on a temporary index and
drives it from `--writers` client connections spread over several processes
(so the client side is not one GIL), each doing what a PUT does: lock, then put.
Baseline in the same run: the same writes, one client, so every write is its own commit.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mkv.model import Record, State
from mkv.writer.client import WriterClient, wait_ready


def _client_proc(sock: str, threads: int, seconds: float, tag: str, out: multiprocessing.Queue) -> None:
    counts = [0] * threads
    deadline = time.monotonic() + seconds

    def run(t: int) -> None:
        client = WriterClient(sock)
        i = 0
        while time.monotonic() < deadline:
            key = f"/{tag}/{t}/{i}"
            client.lock(key)
            client.put(Record(key, State.LIVE, ("a:1", "b:2", "c:3"), 1024, "0" * 32, time.time()))
            i += 1
        counts[t] = i

    ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put(sum(counts))


def drive(sock: str, writers: int, seconds: float, tag: str) -> dict:
    procs_n = min(writers, 8)
    per = [writers // procs_n + (1 if i < writers % procs_n else 0) for i in range(procs_n)]
    before = WriterClient(sock).ping()
    out: multiprocessing.Queue = multiprocessing.Queue()
    started = time.monotonic()
    procs = [multiprocessing.Process(target=_client_proc, args=(sock, n, seconds, f"{tag}{i}", out))
             for i, n in enumerate(per)]
    for p in procs:
        p.start()
    total = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    elapsed = time.monotonic() - started
    after = WriterClient(sock).ping()
    commits = after["commits"] - before["commits"]
    return {"writers": writers, "writes": total, "seconds": elapsed, "writes_per_s": total / elapsed,
            "commits": commits, "commits_per_s": commits / elapsed,
            "keys_per_commit": total / commits if commits else 0.0}


def measure(writers: int, seconds: float, synchronous: str = "NORMAL") -> dict:
    """Start a writer on a temporary index; drive it with 1 writer, then with `writers`."""
    with tempfile.TemporaryDirectory(prefix="mkv-bench-writer-") as d:
        db, sock = str(Path(d) / "i.db"), str(Path(d) / "w.sock")
        proc = subprocess.Popen([sys.executable, "-m", "mkv.writer", "--db", db, "--socket", sock,
                                 "--synchronous", synchronous, "--log-level", "warning"])
        try:
            wait_ready(sock)
            base = drive(sock, 1, seconds, "base")
            conc = drive(sock, writers, seconds, "conc")
        finally:
            proc.terminate()
            proc.wait()
    return {"synchronous": synchronous, "baseline": base, "concurrent": conc}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--writers", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--synchronous", default="NORMAL")
    args = p.parse_args()
    result = measure(args.writers, args.seconds, args.synchronous)
    base, conc = result["baseline"], result["concurrent"]
    for name, r in (("1 writer", base), (f"{args.writers} writers", conc)):
        print(f"{name:>11}: {r['writes_per_s']:8.0f} writes/s  {r['commits_per_s']:7.0f} commits/s  "
              f"{r['keys_per_commit']:5.1f} keys/commit")
    print(f"throughput ratio {args.writers} writers / 1 writer: "
          f"{conc['writes_per_s'] / base['writes_per_s']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
