"""PUT throughput before and after the writer process is SIGKILLed and restarted.

    python -m bench.writer_restart [--seconds 5] [--clients 8] [--rounds 2]

Three volumes and `mkv serve` (R=3, 2 workers). Each round measures small PUTs per
second for `--seconds`, kills the writer, waits for the supervisor to restart it, and
measures again. The ratio after/before is what a restart costs from then on.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time

import requests

from bench.localcluster import local_cluster
from tests.helpers import wait_until


def put_rate(url: str, seconds: float, clients: int, tag: str) -> float:
    """PUTs answered 201 per second by `clients` threads, each on its own session."""
    done = [0] * clients
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        s = requests.Session()
        n = 0
        while time.monotonic() < stop:
            r = s.put(f"{url}/wr/{tag}/{i}/{n}", data=b"x" * 1024, timeout=30)
            n += 1
            if r.status_code == 201:
                done[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / seconds


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.writer_restart")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    with local_cluster(3, replicas=3, workers=2) as (vols, svc):
        put_rate(svc.url, 2.0, args.clients, "warm")
        for r in range(args.rounds):
            before = put_rate(svc.url, args.seconds, args.clients, f"b{r}")
            (writer,) = svc.pids("mkv.writer")
            os.kill(writer, signal.SIGKILL)
            wait_until(lambda w=writer: svc.pids("mkv.writer") and svc.pids("mkv.writer") != [w],
                       15, "the writer to restart")
            put_rate(svc.url, 1.0, args.clients, f"settle{r}")
            after = put_rate(svc.url, args.seconds, args.clients, f"a{r}")
            print(f"round {r + 1}: {before:,.0f} PUT/s before the writer restart, "
                  f"{after:,.0f} after ({after / before:.2f})", flush=True)


if __name__ == "__main__":
    main()
