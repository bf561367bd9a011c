"""What mkv's own work costs with nothing else in the way: the floor under `make bench`.

    python -m bench.floor [--n 2000] [--big 40]

Runs the service's code in this process, on one thread, against three real nginx volumes
and a real writer process, and prints the CPU this process spends per operation and per
part of one: a small PUT (its writer round trips, its pipelined volume requests), a
4 MiB PUT with and without md5, and a GET's lookup with and without the record cache,
alone and with 16 threads at once. gunicorn, the other processes and the load generator
are not in these figures: they are what mkv itself costs at the least, and what the
ratios in `make bench` cannot beat.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mkv.config import Config
from mkv.index import schema
from mkv.index.cache import ChangeCount, RecordCache
from mkv.index.reader import Reader
from mkv.keys import blob_path, sidecar_body, sidecar_path
from mkv.service.store import Store
from mkv.volumes.pool import Pool
from mkv.volumes.wire import Request
from mkv.writer.client import WriterClient, wait_ready
from tests.cluster import NginxVolume

KIB, MIB = 1 << 10, 1 << 20


def cpu_per_op(n: int, op: Callable[[int], object]) -> float:
    """Process CPU seconds per call, all threads of this process included."""
    started = time.process_time()
    for i in range(n):
        op(i)
    return (time.process_time() - started) / n


def threaded(threads: int, n: int, op: Callable[[int], object]) -> float:
    """CPU per call with `threads` threads calling at once (n calls in all)."""
    share = n // threads
    gate = threading.Barrier(threads + 1)

    def run() -> None:
        gate.wait()
        for i in range(share):
            op(i)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    started = time.process_time()
    gate.wait()
    for t in workers:
        t.join()
    return (time.process_time() - started) / (share * threads)


def measure(cfg: Config, changes: ChangeCount, n: int, big: int) -> list[tuple[str, float]]:
    def store(config: Config, cached: bool = False) -> Store:
        reader = Reader(lambda: schema.connect(config.db),
                              RecordCache(changes) if cached else None)
        return Store(config, reader, Pool(config.volume_timeout),
                     lambda: WriterClient(config.writer_socket, timeout=10))

    plain, cached, no_md5 = store(cfg), store(cfg, cached=True), store(dataclasses.replace(cfg, md5=False))
    small, large = os.urandom(KIB), os.urandom(4 * MIB)

    def put(s: Store, prefix: str, body: bytes) -> Callable[[int], object]:
        return lambda i: s.put(f"{prefix}/{i}", len(body), io.BytesIO(body).read, None)

    def pipelined(i: int) -> object:
        key = f"/floor/pipe/{i}"
        both = [Request("PUT", blob_path(key), small),
                Request("PUT", sidecar_path(key), sidecar_body(key, KIB, ""))]
        return plain.pool.exchange({v: both for v in cfg.volumes})

    def writer_pair(i: int) -> object:
        plain.writer.lock(f"/floor/lock/{i}")
        return plain.writer.unlock(f"/floor/lock/{i}")

    cpu_per_op(200, put(plain, "/floor/warm", small))
    def md5(i: int) -> object:
        return hashlib.md5(large, usedforsecurity=False).digest()

    out = [("PUT 1 KiB: all of Store.put", cpu_per_op(n, put(plain, "/floor/small", small))),
           ("PUT 1 KiB: its volume requests (blob + sidecar, pipelined, 3 volumes)",
            cpu_per_op(n, pipelined)),
           ("PUT 1 KiB: a writer round trip pair (lock + unlock)", cpu_per_op(n, writer_pair)),
           ("PUT 4 MiB: all of Store.put (md5 on, the default)",
            cpu_per_op(big, put(plain, "/floor/big", large))),
           ("PUT 4 MiB: all of Store.put with --md5 false",
            cpu_per_op(big, put(no_md5, "/floor/nomd5", large))),
           ("PUT 4 MiB: md5 of the value", cpu_per_op(big, md5))]
    keys = [f"/floor/small/{i}" for i in range(n)]
    for name, s in (("index read", plain), ("the record cache", cached)):
        cpu_per_op(n, lambda i, s=s: s.locate(keys[i]))  # opens the connection, fills the cache
        out.append((f"GET: lookup by {name}, 1 thread", cpu_per_op(n, lambda i, s=s: s.locate(keys[i]))))
        out.append((f"GET: lookup by {name}, 16 threads at once",
                    threaded(16, n, lambda i, s=s: s.locate(keys[i % len(keys)]))))
    return out


def run(n: int, big: int, workdir: Path) -> list[tuple[str, float]]:
    """Start three nginx volumes and a writer under `workdir`, measure, stop them:
    (what, CPU seconds per operation) in the order printed."""
    vols = [NginxVolume.start(workdir / f"vol{i}") for i in range(3)]
    cfg = Config(volumes=tuple(v.address for v in vols), db=str(workdir / "schema.db"), replicas=3)
    changes = ChangeCount.create()
    writer = subprocess.Popen([sys.executable, "-m", "mkv.writer", "--db", cfg.db,
                               "--socket", cfg.writer_socket, "--log-level", "warning",
                               "--changes-fd", str(changes.fd)], pass_fds=(changes.fd,))
    try:
        wait_ready(cfg.writer_socket)
        return measure(cfg, changes, n, big)
    finally:
        writer.terminate()
        writer.wait()
        for v in vols:
            v.stop()


def figure(secs: float) -> str:
    return f"{secs * 1e3:.2f} ms" if secs >= 1e-3 else f"{secs * 1e6:.1f} µs"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="small operations per figure")
    p.add_argument("--big", type=int, default=40, help="4 MiB PUTs per figure")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mkv-bench-floor-") as d:
        rows = run(args.n, args.big, Path(d))
    print("mkv's own CPU per operation, one process, nothing else running:")
    for name, secs in rows:
        print(f"  {figure(secs):>10}  {name}")


if __name__ == "__main__":
    main()
