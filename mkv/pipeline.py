"""Pipelined HTTP/1.1 to nginx volumes over kept-alive sockets.

For the requests where urllib3's per-request cost dominates: a small PUT sends
its blob and sidecar to a volume in one write and reads both answers; sidecars,
copy removals (sidecar then blob) and the rebalance's HEAD checks go to every
volume at once without a thread each; a copied blob is followed by its sidecar on
the same connection; rebuild sends dozens of GETs back to back. nginx answers
pipelined requests in order, so a sidecar is still written only after its blob is
complete. Only what nginx speaks is parsed: Content-Length or chunked bodies
(none after a HEAD).
"""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections import defaultdict
from collections.abc import Iterable

from mkv.keys import blob_path, sidecar_path
from mkv.volume import ShortWrite, VolumeError, VolumeStatus, VolumeTimeout, VolumeUnreachable

# socket.recv(n) allocates n bytes first; keep n small (see mkv.writer.RECV_BYTES)
RECV_BYTES = 1 << 16


class Dropped(Exception):
    """The connection closed before a full answer arrived."""


class BadResponse(Exception):
    """Not HTTP as nginx speaks it."""


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes | None = None


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    length: int  # Content-Length, -1 when the answer had none
    body: bytes


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
        if req.body is None:
            return f"{req.method} {self.prefix}{req.path}{self.headers}\r\n".encode()
        return self.head(req.method, req.path, len(req.body)) + req.body

    def head(self, method: str, path: str, length: int) -> bytes:
        """The request line and headers of a request with a body of `length` bytes."""
        return f"{method} {self.prefix}{path}{self.headers}Content-Length: {length}\r\n\r\n".encode()

    def send(self, data: bytes) -> None:
        if self.sock is None:
            self.sock = socket.create_connection(self.addr, timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(data)

    def _fill(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(RECV_BYTES)
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

    def response(self, head_only: bool = False) -> tuple[int, int, bytes, bool]:
        """(status, Content-Length, body, the volume will close the connection) of the
        next answer. An answer to HEAD (`head_only`) announces a length but has no body."""
        while (end := self.buf.find(b"\r\n\r\n", self.pos)) < 0:
            self._fill()
        head = bytes(self.buf[self.pos:end]).lower()
        self.pos = end + 4
        if not head.startswith(b"http/1."):
            raise BadResponse(f"not an HTTP response: {head[:40]!r}")
        status = int(head[9:12])
        closing = b"\r\nconnection: close" in head
        i = head.find(b"\r\ncontent-length:")
        length = -1
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + 17:j if j >= 0 else len(head)])
        if head_only or status in (204, 304):
            body = b""
        elif length >= 0:
            body = self._take(length)
        elif b"\r\ntransfer-encoding: chunked" in head:
            body = self._chunked()
        else:
            raise BadResponse("response without a length")
        return status, length, body, closing

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
    """Idle connections per volume, shared by a worker's threads; at most `max_idle`
    kept per volume (`put_stream` opens a new one each time, and those would pile up)."""

    def __init__(self, timeout: float, max_idle: int = 32) -> None:
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: dict[str, list[Connection]] = defaultdict(list)
        self._lock = threading.Lock()

    def take(self, volume: str) -> Connection:
        with self._lock:
            idle = self._idle[volume]
            if idle:
                return idle.pop()
        return Connection(volume, self.timeout)

    def give(self, conn: Connection) -> None:
        if conn.sock is None:
            return
        conn.reused = True
        with self._lock:
            idle = self._idle[conn.volume]
            if len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.close()

    def idle(self, volume: str) -> int:
        with self._lock:
            return len(self._idle[volume])

    def exchange(self, work: dict[str, list[Request]], ok: tuple[int, ...] = (200, 201, 204)
                 ) -> dict[str, VolumeError]:
        """Send each volume its requests and check every answer's status; the errors,
        by volume."""
        return {vol: out for vol, out in self.ask(work, ok).items()
                if isinstance(out, VolumeError)}

    def ask(self, work: dict[str, list[Request]], ok: tuple[int, ...] = (200, 201, 204)
            ) -> dict[str, list[Reply] | VolumeError]:
        """Send each volume its requests (all volumes first, then read the answers), so
        the volumes work at once without a thread each. By volume: one Reply per
        request, or the error that stopped them (a status outside `ok` is an error)."""
        conns = {vol: self.take(vol) for vol in work}
        out: dict[str, list[Reply] | VolumeError] = {}
        for vol, reqs in work.items():
            try:
                conns[vol].send(b"".join(conns[vol].encode(r) for r in reqs))
            except OSError:
                conns[vol].close()  # retried below on a new connection
        for vol, reqs in work.items():
            try:
                out[vol] = self._finish(conns[vol], reqs, ok)
            except VolumeError as exc:
                conns[vol].close()
                out[vol] = exc
            self.give(conns[vol])
        return out

    def remove_copies(self, key: str, volumes: Iterable[str]) -> dict[str, VolumeError]:
        """Delete the key's copy on each volume, sidecar then blob (pipelined: nginx runs
        them in order), all volumes at once; already gone counts as done. A copy half
        removed is a lone blob or a lone sidecar, neither of which a rebuild takes.
        The errors, by volume."""
        both = [Request("DELETE", sidecar_path(key)), Request("DELETE", blob_path(key))]
        return self.exchange({vol: both for vol in volumes}, ok=(200, 204, 404))

    def put_stream(self, volume: str, path: str, chunks: Iterable[bytes], length: int,
                   then: list[Request] | None = None) -> None:
        """PUT a body read from `chunks`, then the small requests `then` pipelined behind
        it (a sidecar follows its blob with no round trip in between, and only once the
        whole body is sent). Whatever `chunks` raises passes through, with the connection
        closed so nginx drops the partial body; the volume's failures are VolumeErrors.

        The body cannot be sent twice, so it goes on a new connection: a kept-alive one
        that nginx has closed meanwhile is only found out once the body is gone."""
        then = then or []
        conn = Connection(volume, self.timeout)
        put = Request("PUT", path)

        def send(data: bytes) -> None:
            try:
                conn.send(data)
            except OSError as exc:
                raise _volume_error(volume, put, exc) from exc

        try:
            send(conn.head("PUT", path, length))
            sent = 0
            for chunk in chunks:
                send(chunk)
                sent += len(chunk)
            if sent != length:
                raise ShortWrite(volume, f"PUT {path}: sent {sent} of {length} bytes")
            if then:
                send(b"".join(conn.encode(r) for r in then))
            # not a reused connection, so only `then` can be resent, never the body
            self._finish(conn, [put, *then], (200, 201, 204))
        except BaseException:
            conn.close()
            raise
        self.give(conn)

    def _finish(self, conn: Connection, reqs: list[Request], ok: tuple[int, ...]) -> list[Reply]:
        """Read the answers; resend what a closed or stale connection lost (these requests
        are idempotent: the same bytes to the same path, under the key's lock)."""
        pending = list(reqs)
        replies: list[Reply] = []
        retried = False
        while pending:
            try:
                if conn.sock is None:
                    conn.send(b"".join(conn.encode(r) for r in pending))
                while pending:
                    req = pending[0]
                    status, length, body, closing = conn.response(head_only=req.method == "HEAD")
                    pending.pop(0)
                    if status not in ok:
                        raise VolumeStatus(conn.volume, status, req.method, req.path)
                    replies.append(Reply(status, length, body))
                    if closing:
                        conn.close()
                        break
            except (Dropped, ConnectionError) as exc:
                stale = conn.reused and not replies and not retried
                conn.close()
                if not stale:
                    raise _volume_error(conn.volume, pending[0], exc) from exc
                retried = True  # nginx closed the idle connection: once more on a new one
            except (OSError, BadResponse, ValueError) as exc:
                raise _volume_error(conn.volume, pending[0], exc) from exc
        return replies
