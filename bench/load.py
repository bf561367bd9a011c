"""A small closed-loop HTTP load generator on asyncio, for what wrk cannot do.

wrk talks to one host, so it cannot play the baseline of a PUT (the same bytes sent
straight to R volumes in parallel) nor follow a redirect to a volume. This client does
both, and runs the mkv side of those workloads too, so mkv and its baseline are measured
by the same code. It speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies) to
stay cheap: one event loop, answers read into one reused buffer per connection, bodies
counted rather than kept. Its own CPU use is reported beside every result, so a reader
can tell when the client was the limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

Address = tuple[str, int]


class HttpError(RuntimeError):
    """An answer the workload did not expect (status, framing)."""


def address(hostport: str) -> Address:
    host, _, port = hostport.rpartition(":")
    return host, int(port)


class _Response(asyncio.BufferedProtocol):
    """Reads answers into one reused buffer and keeps only the header block.

    Bodies are counted, never stored: with asyncio's streams a 4 MiB GET cost the
    client three user-space copies and a full core at ~100 MB/s; recv_into a fixed
    buffer leaves only the kernel's copy.
    """

    def __init__(self) -> None:
        self.view = memoryview(bytearray(256 << 10))
        self.head = bytearray()
        self.left = -1  # body bytes still to come; -1 while in the header block
        self.done: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.left < 0:
            self.head += self.view[:nbytes]
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            body_seen = len(self.head) - end - 4
            del self.head[end + 4:]
            length = header_int(bytes(self.head), b"content-length")
            if length is None:
                self._finish(exc=HttpError(f"answer without Content-Length: {bytes(self.head)!r}"))
                return
            self.left = length - body_seen
        else:
            self.left -= nbytes
        if self.left == 0:
            self._finish()

    def _finish(self, exc: BaseException | None = None) -> None:
        done, self.done = self.done, None
        head, self.head, self.left = bytes(self.head), bytearray(), -1
        if done is None or done.done():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result((int(head[9:12]), head))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._finish(exc or ConnectionResetError("server closed the connection"))


class Conn:
    """One keep-alive connection; reopened transparently when the server closed it."""

    def __init__(self, addr: Address) -> None:
        self.addr = addr
        self.host = f"{addr[0]}:{addr[1]}".encode()
        self.proto: _Response | None = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """(status, raw header block); the body, if any, is read and dropped."""
        if self.proto is None or self.proto.transport is None:
            loop = asyncio.get_running_loop()
            _, self.proto = await loop.create_connection(_Response, *self.addr)
        proto = self.proto
        assert proto.transport is not None
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode(), path.encode(), self.host)
        if body is not None:
            head += b"Content-Length: %d\r\n" % len(body)
        proto.done = asyncio.get_running_loop().create_future()
        waiter = proto.done
        if body and len(body) > 65536:
            proto.transport.write(head + b"\r\n")
            proto.transport.write(body)  # not joined to the head: that would copy the value
        else:
            proto.transport.write(head + b"\r\n" + (body or b""))
        status, raw = await waiter
        if header(raw, b"connection") == b"close":
            self.close()
        return status, raw

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()
        self.proto = None


def header_int(head: bytes, name: bytes) -> int | None:
    value = header(head, name)
    return int(value) if value is not None else None


def header(head: bytes, name: bytes) -> bytes | None:
    """A header's value from a raw header block; `name` in lower case, matched case-blind."""
    i = head.lower().find(b"\r\n" + name + b":")
    if i < 0:
        return None
    start = i + len(name) + 3
    return head[start:head.index(b"\r\n", start)].strip()


class Client:
    """One virtual client: its own keep-alive connection to each host it talks to."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.conns: dict[Address, Conn] = {}

    def conn(self, addr: Address) -> Conn:
        c = self.conns.get(addr)
        if c is None:
            c = self.conns[addr] = Conn(addr)
        return c

    def close(self) -> None:
        for c in self.conns.values():
            c.close()


#: An operation: (client, sequence number) -> bytes of value moved. Raises HttpError.
Op = Callable[[Client, int], Awaitable[int]]


@dataclasses.dataclass
class LoadResult:
    """What a closed-loop run did; latencies are per operation, in seconds."""

    ops: int
    seconds: float
    value_bytes: int
    errors: int
    first_error: str
    latencies: list[float]
    client_cpu: float  # CPU seconds the client used / wall seconds (1.0 = one full core)

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.value_bytes / 1e6 / self.seconds

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def summary(self) -> dict:
        return {"ops": self.ops, "seconds": round(self.seconds, 3),
                "ops_per_s": round(self.ops_per_s, 1), "mb_per_s": round(self.mb_per_s, 1),
                "p50_ms": round(self.percentile(50) * 1e3, 2),
                "p99_ms": round(self.percentile(99) * 1e3, 2),
                "errors": self.errors, "first_error": self.first_error,
                "client_cpu": round(self.client_cpu, 2)}


async def _closed_loop(op: Op, concurrency: int, seconds: float, max_ops: int) -> LoadResult:
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    moved = [0]
    errors: list[str] = []
    seq = iter(range(max_ops))

    async def worker(client: Client) -> None:
        try:
            for n in seq:
                if time.monotonic() >= deadline:
                    return
                t0 = time.perf_counter()
                try:
                    nbytes = await op(client, n)  # not `moved[0] += await ...`: that races
                except (HttpError, OSError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    client.close()
                    continue
                moved[0] += nbytes
                latencies.append(time.perf_counter() - t0)
        finally:
            client.close()

    cpu0, t0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(worker(Client(i)) for i in range(concurrency)))
    wall = time.monotonic() - t0
    return LoadResult(len(latencies), wall, moved[0], len(errors), errors[0] if errors else "",
                      latencies, (time.process_time() - cpu0) / wall)


def run(op: Op, concurrency: int, seconds: float, max_ops: int = 1 << 62) -> LoadResult:
    """Run `op` from `concurrency` clients back to back until `seconds` or `max_ops`."""
    return asyncio.run(_closed_loop(op, concurrency, seconds, max_ops))


def location(head: bytes) -> tuple[Address, str]:
    """Where a 302 points: the volume's address and the path on it."""
    value = header(head, b"location")
    if value is None:
        raise HttpError("302 without Location")
    parts = urlsplit(value.decode())
    return (parts.hostname or "", parts.port or 80), parts.path
