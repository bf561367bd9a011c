"""Pipelined HTTP/1.1 to nginx volumes over kept-alive sockets.

For the hot paths where urllib3's per-request cost dominates: a small PUT sends
its blob and sidecar requests to a volume in one write and reads both answers,
and rebuild sends dozens of GETs back to back. nginx answers pipelined requests
in order, so a sidecar is still written only after its blob is complete.
Only what nginx speaks is parsed: Content-Length or chunked bodies.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections import defaultdict

from mkv.volume import VolumeError, VolumeStatus, VolumeTimeout, VolumeUnreachable


class Dropped(Exception):
    """The connection closed before a full answer arrived."""


class BadResponse(Exception):
    """Not HTTP as nginx speaks it."""


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes | None = None


class Connection:
    """One keep-alive connection to a volume. Not thread-safe."""

    def __init__(self, volume: str, timeout: float, agent: str = "mkv") -> None:
        self.volume = volume
        hostport, _, prefix = volume.partition("/")
        self.prefix = "/" + prefix if prefix else ""
        host, _, port = hostport.rpartition(":")
        self.addr = (host[1:-1] if host.startswith("[") else host, int(port))
        self.headers = f" HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: {agent}\r\n"
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.pos = 0
        self.reused = False  # served an earlier exchange: nginx may have closed it since

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.buf = bytearray()
        self.pos = 0
        self.reused = False

    def encode(self, req: Request) -> bytes:
        head = f"{req.method} {self.prefix}{req.path}{self.headers}"
        if req.body is None:
            return (head + "\r\n").encode()
        return (head + f"Content-Length: {len(req.body)}\r\n\r\n").encode() + req.body

    def send(self, data: bytes) -> None:
        if self.sock is None:
            self.sock = socket.create_connection(self.addr, timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(data)

    def _fill(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(1 << 18)
        if not data:
            raise Dropped("connection closed by the volume")
        if self.pos and self.pos >= len(self.buf) // 2:
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += data

    def _line_end(self, pos: int) -> int:
        while (end := self.buf.find(b"\r\n", pos)) < 0:
            self._fill()
            pos = self.pos  # _fill may have compacted the buffer
        return end

    def _take(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            self._fill()
        body = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return body

    def response(self) -> tuple[int, bytes, bool]:
        """(status, body, the volume will close the connection) of the next answer."""
        while (end := self.buf.find(b"\r\n\r\n", self.pos)) < 0:
            self._fill()
        head = bytes(self.buf[self.pos:end]).lower()
        self.pos = end + 4
        if not head.startswith(b"http/1."):
            raise BadResponse(f"not an HTTP response: {head[:40]!r}")
        status = int(head[9:12])
        closing = b"\r\nconnection: close" in head
        i = head.find(b"\r\ncontent-length:")
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            body = self._take(int(head[i + 17:j if j >= 0 else len(head)]))
        elif b"\r\ntransfer-encoding: chunked" in head:
            body = self._chunked()
        elif status in (204, 304):
            body = b""
        else:
            raise BadResponse("response without a length")
        return status, body, closing

    def _chunked(self) -> bytes:
        parts = []
        while True:
            end = self._line_end(self.pos)
            size = int(bytes(self.buf[self.pos:end]).split(b";")[0], 16)
            self.pos = end + 2
            if size == 0:
                while (end := self._line_end(self.pos)) != self.pos:  # trailers, then a blank
                    self.pos = end + 2
                self.pos += 2
                return b"".join(parts)
            parts.append(self._take(size))
            self._take(2)


def _volume_error(volume: str, req: Request, exc: BaseException) -> VolumeError:
    if isinstance(exc, TimeoutError):
        return VolumeTimeout(volume, f"{req.method} {req.path}: timed out")
    return VolumeUnreachable(volume, f"{req.method} {req.path}: {exc or type(exc).__name__}")


class Pool:
    """Idle connections per volume, shared by a worker's threads."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._idle: dict[str, list[Connection]] = defaultdict(list)
        self._lock = threading.Lock()

    def take(self, volume: str) -> Connection:
        with self._lock:
            idle = self._idle[volume]
            if idle:
                return idle.pop()
        return Connection(volume, self.timeout)

    def give(self, conn: Connection) -> None:
        if conn.sock is not None:
            conn.reused = True
            with self._lock:
                self._idle[conn.volume].append(conn)

    def exchange(self, work: dict[str, list[Request]], ok: tuple[int, ...] = (200, 201, 204)
                 ) -> dict[str, VolumeError]:
        """Send each volume its requests (all volumes first, then read the answers), so
        the volumes work at once without a thread each. The errors, by volume."""
        conns = {vol: self.take(vol) for vol in work}
        errors: dict[str, VolumeError] = {}
        for vol, reqs in work.items():
            try:
                conns[vol].send(b"".join(conns[vol].encode(r) for r in reqs))
            except OSError:
                conns[vol].close()  # retried below on a new connection
        for vol, reqs in work.items():
            try:
                self._finish(conns[vol], reqs, ok)
            except VolumeError as exc:
                conns[vol].close()
                errors[vol] = exc
            self.give(conns[vol])
        return errors

    def _finish(self, conn: Connection, reqs: list[Request], ok: tuple[int, ...]) -> None:
        """Read the answers; resend what a closed or stale connection lost (these requests
        are idempotent: the same bytes to the same path, under the key's lock)."""
        pending = list(reqs)
        retried = False
        while pending:
            try:
                if conn.sock is None:
                    conn.send(b"".join(conn.encode(r) for r in pending))
                while pending:
                    status, _, closing = conn.response()
                    req = pending.pop(0)
                    if status not in ok:
                        raise VolumeStatus(conn.volume, status, req.method, req.path)
                    if closing:
                        conn.close()
                        break
            except (Dropped, ConnectionError) as exc:
                stale = conn.reused and len(pending) == len(reqs) and not retried
                conn.close()
                if not stale:
                    raise _volume_error(conn.volume, pending[0], exc) from exc
                retried = True  # nginx closed the idle connection: once more on a new one
            except (OSError, BadResponse, ValueError) as exc:
                raise _volume_error(conn.volume, pending[0], exc) from exc
