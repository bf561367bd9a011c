"""HTTP/1.1 as nginx speaks it, on one kept-alive socket: requests are encoded and
answers parsed by hand, so several requests can be pipelined in one write (nginx
answers pipelined requests in order). Only what nginx sends is parsed: Content-Length
or chunked bodies (none after a HEAD)."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from mkv import context

# socket.recv(n) allocates n bytes first; keep n small (see mkv.writer.protocol.RECV_BYTES)
RECV_BYTES = 1 << 16


class Dropped(Exception):
    """The connection closed before a full answer arrived."""


class BadResponse(Exception):
    """Not HTTP as nginx speaks it."""


class GaveUp(TimeoutError):
    """The caller stopped waiting on this volume before the timeout (it was marked
    down, or it is far slower than the other replicas): a timeout, only sooner."""


#: How often a wait with a `give_up` check looks again.
POLL_SECONDS = 0.1


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
        #: while set, a wait on this volume ends early once it answers True
        self.give_up: Callable[[], bool] | None = None

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
        """A whole request; within a client request it carries that request's id
        (mkv.context), and the volume is noted as one the request touched."""
        if req.body is None:
            return (f"{req.method} {self.prefix}{req.path}{self.headers}"
                    f"{context.sending_to(self.volume)}\r\n").encode()
        return self.request_head(req.method, req.path, len(req.body)) + req.body

    def request_head(self, method: str, path: str, length: int | None) -> bytes:
        """The request line and headers of a request with a body of `length` bytes, or of
        a chunked body (`length` None: its size is known only at its end, nginx takes it
        since 1.3.9 and keeps nothing of one that is cut off before its last chunk)."""
        framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
        return (f"{method} {self.prefix}{path}{self.headers}{context.sending_to(self.volume)}"
                f"{framing}\r\n\r\n").encode()

    def send(self, data: bytes) -> None:
        if self.sock is None:
            self.sock = socket.create_connection(self.addr, timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.give_up is None:
            self.sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            view = view[self._waiting(self.sock.send, view):]

    def _waiting(self, io: Callable[[Any], Any], arg: Any) -> Any:
        """`io(arg)` on the socket, in slices of POLL_SECONDS: between slices `give_up`
        may end the wait early; the whole wait still ends at the timeout."""
        assert self.sock is not None
        if self.give_up is None:
            return io(arg)
        deadline = time.monotonic() + self.timeout
        self.sock.settimeout(min(POLL_SECONDS, self.timeout))
        try:
            while True:
                try:
                    return io(arg)
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        raise
                    if self.give_up():
                        raise GaveUp("gave up waiting (marked down, or far slower than "
                                     "the other replicas)") from None
        finally:
            self.sock.settimeout(self.timeout)

    def _fill(self) -> None:
        assert self.sock is not None
        data = self._waiting(self.sock.recv, RECV_BYTES)
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

    def read_head(self) -> tuple[int, int, bool, bool]:
        """(status, Content-Length or -1, the volume will close the connection, the body is
        chunked) of the next answer; its body, if any, is still to be read."""
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
        return status, length, closing, b"\r\ntransfer-encoding: chunked" in head

    def response(self, head_only: bool = False) -> tuple[int, int, bytes, bool]:
        """(status, Content-Length, body, the volume will close the connection) of the
        next answer. An answer to HEAD (`head_only`) announces a length but has no body."""
        status, length, closing, chunked = self.read_head()
        if head_only or status in (204, 304):
            body = b""
        elif length >= 0:
            body = self._take(length)
        elif chunked:
            body = self._chunked()
        else:
            raise BadResponse("response without a length")
        return status, length, body, closing

    def body_chunks(self, length: int, size: int) -> Iterator[bytes]:
        """The next `length` bytes of a body, at most `size` at a time, without holding
        more than one chunk: what is buffered first, then straight from the socket."""
        left = length
        while left:
            if self.pos < len(self.buf):
                n = min(left, size, len(self.buf) - self.pos)
                chunk = bytes(self.buf[self.pos:self.pos + n])
                self.pos += n
            else:
                self.buf, self.pos = bytearray(), 0
                assert self.sock is not None
                chunk = self.sock.recv(min(left, size, RECV_BYTES))
                if not chunk:
                    raise Dropped(f"connection closed with {left} of {length} body bytes unread")
            left -= len(chunk)
            yield chunk

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
