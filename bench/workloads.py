"""The workloads of `make bench`, each measured on mkv and on its baseline in one run.

Every function returns plain data (dicts of numbers) for the report. mkv and its
baseline get the same load generator, concurrency, value bytes and duration. They run
one after the other (never at once: they share the machine's cores), after a warm-up
of each, in several interleaved rounds whose median is reported, so a burst of other
work on the machine or one unlucky split of connections between gunicorn workers does
not decide a ratio. PUT phases start after a sync, so neither side pays the other's
writeback. The CPU each side's server processes used per request is recorded too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import requests

from bench import load, wrk
from bench.load import Client, HttpError
from mkv.keys import blob_path, sidecar_body, sidecar_path
from tests.cluster import NginxVolume, free_port, group_alive
from tests.service import MkvService

KIB, MIB = 1 << 10, 1 << 20


@dataclasses.dataclass(frozen=True)
class Settings:
    """How long and how hard; quick and full differ only in these numbers."""

    full: bool
    seconds: float  # one measured phase
    rounds: int  # interleaved baseline/mkv rounds; the median round is reported
    big_rounds: int  # the same for large values (each round writes GBs)
    warmup: float
    workers: int
    threads: int
    get_connections: int = 32
    # GETs: more, shorter rounds than the PUTs'. The machine's slow spells last seconds, so
    # a round whose two runs are a second apart mostly sees one speed on both sides
    get_rounds: int = 11
    get_seconds: float = 1.0
    put_clients: int = 32
    big_clients: int = 8
    writer_clients: int = 64
    put_sizes: tuple[int, ...] = (KIB,)
    big_sizes: tuple[int, ...] = (4 * MIB,)
    big_bytes_cap: int = 4 << 30  # value bytes per big PUT phase: bounds disk use
    memory_mib: int = 256


class Baseline:
    """`python -m bench.baseline` in its own session, stopped with its whole group."""

    def __init__(self, workers: int, threads: int) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.baseline", "--port", str(self.port),
             "--workers", str(workers), "--threads", str(threads)],
            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(self.url + "/", allow_redirects=False, timeout=1)
                return
            except requests.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("bench.baseline did not start") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_group(self.proc, 15)
        self.proc.wait()


class Cluster:
    """Three nginx volumes, `mkv serve` over them (R=3), and the bare-WSGI baseline."""

    def __init__(self, workdir: Path, settings: Settings) -> None:
        self.volumes: list[NginxVolume] = []
        self.baseline: Baseline | None = None
        self.service: MkvService | None = None
        try:
            self.volumes = [NginxVolume.start(workdir / f"vol{i}") for i in range(3)]
            self.service = MkvService(
                workdir / "svc", [v.address for v in self.volumes], replicas=3,
                workers=settings.workers,
                extra=["--threads", str(settings.threads), "--log-level", "warning"]).start()
            self.baseline = Baseline(settings.workers, settings.threads)
        except BaseException:
            self.close()
            raise

    @property
    def svc(self) -> MkvService:
        assert self.service is not None
        return self.service

    @property
    def mkv_group(self) -> set[int]:
        """mkv serve's process group: master, workers, writer, health."""
        assert self.svc.proc is not None
        return {self.svc.proc.pid}

    @property
    def nginx_groups(self) -> set[int]:
        return {v.proc.pid for v in self.volumes}

    def purge_blobs(self) -> None:
        """Delete every blob and sidecar from the volumes' disks (not nginx's own files).

        Large-value rounds write gigabytes; removing them between rounds bounds disk use
        (FULL would otherwise leave tens of GB) and drops their pending writeback, so the
        next round's sync is short. The index keeps pointing at them; no later workload
        reads those keys.
        """
        for v in self.volumes:
            for d in v.root.iterdir():
                if len(d.name) == 2 and d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)

    @property
    def base(self) -> Baseline:
        assert self.baseline is not None
        return self.baseline

    def close(self) -> None:
        """Stop everything; safe to call twice."""
        if self.baseline is not None:
            self.baseline.stop()
            self.baseline = None
        if self.service is not None:
            self.service.stop()
            self.service = None
        for v in self.volumes:
            v.stop()
        self.volumes = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def group_cpu(pgids: set[int]) -> float:
    """CPU seconds (user + system) used so far by the live processes of these groups.

    CPU per request is the steadier figure on a small shared machine: req/s swings with
    how gthread's workers happened to split wrk's connections (one worker often takes
    nearly all of them) and with what else runs, while the cost of a request does not.
    """
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) in pgids:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def ratio(mkv: float, baseline: float) -> float:
    return mkv / baseline if baseline else 0.0


def median(runs: list[dict], metric: str) -> dict:
    """The run with the median figure: one stall (this machine is shared) does not decide."""
    return sorted(runs, key=lambda r: r[metric])[len(runs) // 2]


def interleaved(rounds: int, base: Callable[[int], dict], mkv: Callable[[int], dict],
                metric: str, parts: tuple[str, ...] = ()) -> dict:
    """`rounds` rounds of baseline and mkv, alternating which goes first.

    Reports the median round of each side by `metric` (of each of `parts`, when a
    round measures several things), every round, and as the ratio the median of the
    rounds' own ratios: each round's two runs are seconds apart, and on this shared
    machine the speed of both sides swings by up to 3x over tens of seconds, so a
    round compares like with like where the two medians may come from different
    moments. The ratio of the medians is kept too ("ratio_of_medians").
    """
    runs: dict[str, list[dict]] = {"baseline": [], "mkv": []}
    for i in range(rounds):
        order = (("baseline", base), ("mkv", mkv)) if i % 2 == 0 else (("mkv", mkv), ("baseline", base))
        for side, fn in order:
            runs[side].append(fn(i))
    out: dict = {"rounds": runs}
    for part in parts or ("",):
        def value(run: dict, part: str = part) -> float:
            return (run[part] if part else run)[metric]
        name = f"{part}_ratio" if part else "ratio"
        out[name] = statistics.median(ratio(value(m), value(b))
                                      for m, b in zip(runs["mkv"], runs["baseline"], strict=True))
        if part:
            for side, rs in runs.items():
                out.setdefault(side, {})[part] = median([r[part] for r in rs], metric)
        else:
            for side, rs in runs.items():
                out[side] = median(rs, metric)
        out[f"{name}_of_medians"] = ratio(value(out["mkv"]), value(out["baseline"]))
    return out


def _wrk_pair(c: Cluster, s: Settings, path: str, expect_status_errors: bool) -> dict:
    """The same wrk runs against mkv and the baseline, after a warm-up of each; with the
    CPU each server's processes spent per request."""
    def measure(url: str, group: set[int]) -> dict:
        before = group_cpu(group)
        r = wrk.run(url, s.get_seconds, s.get_connections)
        cpu = (group_cpu(group) - before) / max(r.requests, 1) * 1e6
        bad = r.requests - r.status_errors if expect_status_errors else r.status_errors
        if bad or r.socket_errors:
            raise RuntimeError(f"wrk {url}: {bad} unexpected statuses, "
                               f"{r.socket_errors} socket errors")
        return {**r.summary(), "server_cpu_us": round(cpu, 1)}

    mkv_url, base_url = c.svc.url + path, c.base.url + path
    for url in (base_url, mkv_url):
        wrk.run(url, s.warmup, s.get_connections)
    assert c.base.proc is not None
    return interleaved(s.get_rounds, lambda i: measure(base_url, {c.base.proc.pid}),
                       lambda i: measure(mkv_url, c.mkv_group), "rps")


def get_hit(c: Cluster, s: Settings) -> dict:
    """Workload 1: GET of an existing key, the 302 not followed."""
    requests.put(c.svc.url + "/bench/hit", data=b"h" * KIB).raise_for_status()
    for url in (c.svc.url, c.base.url):
        status = requests.get(url + "/bench/hit", allow_redirects=False).status_code
        if status != 302:
            raise RuntimeError(f"{url}/bench/hit answered {status}, not 302")
    return _wrk_pair(c, s, "/bench/hit", False)


def get_miss(c: Cluster, s: Settings) -> dict:
    """Workload 2: GET of a key that does not exist (404)."""
    return _wrk_pair(c, s, "/missing/key", True)


def _expect(status: int, ok: tuple[int, ...], what: str) -> None:
    if status not in ok:
        raise HttpError(f"{what} answered {status}")


def mkv_put(c: Cluster, prefix: str, body: bytes, keys: list[str] | None = None) -> load.Op:
    """One PUT through mkv; successful keys are appended to `keys` when given."""
    addr = load.address(c.svc.url.removeprefix("http://"))

    async def op(client: Client, n: int) -> int:
        key = f"{prefix}/{client.index}-{n}"
        status, _ = await client.conn(addr).request("PUT", key, body)
        _expect(status, (201,), f"PUT {key}")
        if keys is not None:
            keys.append(key)
        return len(body)
    return op


def direct_put(c: Cluster, prefix: str, body: bytes, keys: list[str] | None = None) -> load.Op:
    """What mkv does per PUT, done by the client: blob then sidecar, on R volumes at once."""
    addrs = [load.address(v.address) for v in c.volumes]
    md5 = hashlib.md5(body).hexdigest()

    async def op(client: Client, n: int) -> int:
        key = f"{prefix}/{client.index}-{n}"
        blob, side = blob_path(key), sidecar_path(key)
        sidecar = sidecar_body(key, len(body), md5)

        async def replica(addr: load.Address) -> None:
            conn = client.conn(addr)
            status, _ = await conn.request("PUT", blob, body)
            _expect(status, (201, 204), f"PUT {blob}")
            status, _ = await conn.request("PUT", side, sidecar)
            _expect(status, (201, 204), f"PUT {side}")

        await asyncio.gather(*(replica(a) for a in addrs))
        if keys is not None:
            keys.append(key)
        return len(body)
    return op


def mkv_get(c: Cluster, keys: list[str]) -> load.Op:
    """GET through mkv, following the 302 to the volume for the bytes."""
    addr = load.address(c.svc.url.removeprefix("http://"))

    async def op(client: Client, n: int) -> int:
        key = keys[(client.index * 7919 + n) % len(keys)]
        status, head = await client.conn(addr).request("GET", key)
        _expect(status, (302,), f"GET {key}")
        vol, path = load.location(head)
        status, head = await client.conn(vol).request("GET", path)
        _expect(status, (200,), f"GET {path}")
        return load.header_int(head, b"content-length") or 0
    return op


def direct_get(c: Cluster, keys: list[str]) -> load.Op:
    """GET straight from a volume, replicas taken in turn as mkv's redirects spread them."""
    addrs = [load.address(v.address) for v in c.volumes]

    async def op(client: Client, n: int) -> int:
        key = keys[(client.index * 7919 + n) % len(keys)]
        path = blob_path(key)
        status, head = await client.conn(addrs[n % len(addrs)]).request("GET", path)
        _expect(status, (200,), f"GET {path}")
        return load.header_int(head, b"content-length") or 0
    return op


def _measure(c: Cluster, s: Settings, op: load.Op, clients: int, max_ops: int = 1 << 62,
             sync: bool = False) -> dict:
    """One closed-loop run; its summary with the CPU mkv and nginx spent per operation."""
    if sync:
        os.sync()
    before = {"mkv": group_cpu(c.mkv_group), "nginx": group_cpu(c.nginx_groups)}
    result = load.run(op, clients, s.seconds, max_ops)
    if result.errors:
        raise RuntimeError(f"{result.errors} failed operations, first: {result.first_error}")
    after = {"mkv": group_cpu(c.mkv_group), "nginx": group_cpu(c.nginx_groups)}
    per_op = {f"{k}_cpu_us": round((after[k] - before[k]) / max(result.ops, 1) * 1e6, 1)
              for k in before}
    return {**result.summary(), **per_op}


def _warm(s: Settings, op: load.Op, clients: int) -> None:
    load.run(op, clients, s.warmup, clients * 4)


def put_small(c: Cluster, s: Settings, size: int) -> dict:
    """Workload 3: PUTs of distinct keys, mkv against the same bytes sent to R volumes.

    wrk also PUTs to mkv (Lua, unique paths): if it gets the same rate as our Python
    client, the client was not what limited mkv's figure.
    """
    body = os.urandom(size)
    tag = f"/bench/put{size}"
    _warm(s, direct_put(c, tag + "/warm/base", body), s.put_clients)
    _warm(s, mkv_put(c, tag + "/warm/mkv", body), s.put_clients)
    out = interleaved(
        s.rounds,
        lambda i: _measure(c, s, direct_put(c, f"{tag}/base{i}", body), s.put_clients, sync=True),
        lambda i: _measure(c, s, mkv_put(c, f"{tag}/mkv{i}", body), s.put_clients, sync=True),
        "ops_per_s")
    os.sync()
    cross = wrk.run(c.svc.url, s.seconds, s.put_clients, wrk.PUT_SCRIPT,
                    {"WRK_BODY_BYTES": str(size), "WRK_PREFIX": tag + "/wrk/"})
    return {"size": size, "clients": s.put_clients, "mkv_wrk": cross.summary(), **out}


def put_get_big(c: Cluster, s: Settings, size: int) -> dict:
    """Workload 4: PUT then GET of large values by a few clients, in MB/s of values."""
    body = os.urandom(size)
    cap = max(s.big_clients * 2, s.big_bytes_cap // size)
    tag = f"/bench/big{size}"

    def side(put: Callable[..., load.Op], get: Callable[..., load.Op], name: str) -> Callable[[int], dict]:
        def one_round(i: int) -> dict:
            keys: list[str] = []
            wrote = _measure(c, s, put(c, f"{tag}/{name}{i}", body, keys), s.big_clients, cap, sync=True)
            read = _measure(c, s, get(c, keys), s.big_clients)
            c.purge_blobs()
            return {"put": wrote, "get": read}
        return one_round

    for name, put, get in (("base", direct_put, direct_get), ("mkv", mkv_put, mkv_get)):
        warm: list[str] = []
        _warm(s, put(c, f"{tag}/warm{name}", body, warm), s.big_clients)
        _warm(s, get(c, warm), s.big_clients)
    out = interleaved(s.big_rounds, side(direct_put, direct_get, "base"), side(mkv_put, mkv_get, "mkv"),
                      "mb_per_s", ("put", "get"))
    return {"size": size, "clients": s.big_clients, **out}


def writer_under_puts(c: Cluster, s: Settings) -> dict:
    """Workload 6 through the real service: group commit while `writer_clients` PUT at once."""
    def counters() -> dict:
        return requests.get(c.svc.url + "/-/health", timeout=10).json()["writer"]

    body = os.urandom(KIB)
    before = counters()
    result = _measure(c, s, mkv_put(c, "/bench/writer", body), s.writer_clients, sync=True)
    after = counters()
    commits = after["commits"] - before["commits"]
    ops = after["committed_ops"] - before["committed_ops"]
    return {"clients": s.writer_clients, "puts": result,
            "commits": commits, "committed_ops": ops,
            "commits_per_s": commits / result["seconds"],
            "keys_per_commit": ops / commits if commits else 0.0}


def stop_group(proc: subprocess.Popen, timeout: float, linger: float = 0.0) -> None:
    """SIGTERM a process started in a group of its own, wait up to `timeout` for it and
    up to `linger` more for the rest of its group, then SIGKILL whatever is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + linger
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
