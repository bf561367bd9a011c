"""The volume client: kept-alive connections per volume shared by a process's threads.

Small requests (a small PUT's blob and sidecar, sidecars, copy removals, the rebalance's
HEAD checks, the rebuild's listings and sidecar reads) are pipelined, every volume at once
without a thread each; a streamed body goes on a connection of its own and is followed by
its sidecar on the same connection, so a sidecar is still written only after its blob is
complete.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable

from mkv.keys import blob_path, sidecar_path
from mkv.volumes.errors import ShortWrite, VolumeError, VolumeStatus, VolumeTimeout, VolumeUnreachable
from mkv.volumes.wire import BadResponse, Connection, Dropped, Reply, Request


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
