"""The volume client: kept-alive connections per volume, shared by a process's threads.

Every process (service workers, health, rebuild, rebalance) talks to nginx through this
one module, with one error translation (`volume_error`) and one retry policy (`Retry`).

- Small requests (a small PUT's blob and sidecar, sidecars, copy removals, HEAD checks,
  listings and sidecar reads) are pipelined: every volume at once, without a thread each
  (`ask`, `exchange`, `get_many`).
- A streamed body goes on a connection of its own, followed by its small requests on the
  same connection (`put_stream`), so a sidecar is written only after its blob is complete;
  `FanOut` streams one body to several volumes with bounded memory.
- A streamed read (`download`) hands out a blob's bytes a chunk at a time.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import queue
import select
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Container, Iterable, Iterator
from concurrent.futures import Executor, Future

from mkv.keys import blob_path, sidecar_path
from mkv.volumes.errors import (
    ShortWrite,
    UploadAborted,
    VolumeError,
    VolumeStatus,
    VolumeTimeout,
    VolumeUnreachable,
)
from mkv.volumes.wire import BadResponse, Connection, Dropped, GaveUp, Reply, Request

OK = (200, 201, 204)


@dataclasses.dataclass(frozen=True)
class Retry:
    """When requests that carry no streamed body are sent again on a new connection.

    A kept-alive connection that nginx closed while it sat idle is only found out when
    it is used: that first failure is always retried, once. Beyond it, `attempts`
    consecutive failures without an answer in between give up, `backoff` seconds apart.
    The service fails fast (a volume that drops requests is blamed and routed around);
    the rebuild, which must read everything, is patient. Every request retried is
    idempotent: the same bytes to the same path, a DELETE, a GET or a HEAD.
    """

    attempts: int = 1
    backoff: tuple[float, ...] = ()

    def pause(self, failures: int) -> float:
        return self.backoff[min(failures, len(self.backoff)) - 1] if self.backoff else 0.0


#: For tools that must read every volume to the end (mkv-rebuild).
PATIENT = Retry(attempts=4, backoff=(0.2, 0.5, 1.0))


def volume_error(volume: str, req: Request, exc: BaseException) -> VolumeError:
    """The one translation of a transport failure into a typed VolumeError."""
    if isinstance(exc, VolumeError):
        return exc
    if isinstance(exc, GaveUp):
        return VolumeTimeout(volume, f"{req.method} {req.path}: {exc}")
    if isinstance(exc, TimeoutError):
        return VolumeTimeout(volume, f"{req.method} {req.path}: timed out")
    return VolumeUnreachable(volume, f"{req.method} {req.path}: {exc or type(exc).__name__}")


class Hedge:
    """When to stop waiting on one volume of a pipelined exchange: every other volume
    has answered (its reply read, or waiting in its socket), and this one has taken
    HEDGE_FACTOR times as long as they did, and at least HEDGE_MIN_SECONDS."""

    def __init__(self, conns: dict[str, Connection], done: dict[str, object]) -> None:
        self.conns = conns
        self.done = done
        self.sent = time.monotonic()
        self.others_at: dict[str, float] = {}

    def late(self, volume: str) -> bool:
        if len(self.conns) < 2:
            return False  # nothing to compare with: only the timeout ends the wait
        now = time.monotonic()
        if volume not in self.others_at:
            waiting = [c.sock for v, c in self.conns.items()
                       if v != volume and v not in self.done and c.sock is not None]
            if waiting and len(select.select(waiting, [], [], 0)[0]) < len(waiting):
                return False  # another replica is still at work too
            self.others_at[volume] = now
        took = self.others_at[volume] - self.sent
        return now - self.sent > max(HEDGE_MIN_SECONDS, HEDGE_FACTOR * took)


HEDGE_MIN_SECONDS = 1.0
HEDGE_FACTOR = 10.0


def _give_up(volume: str, gone: Callable[[str], bool] | None, hedge: Hedge | None) -> bool:
    return (gone is not None and gone(volume)) or (hedge is not None and hedge.late(volume))


#: What a broken connection raises; all of it means "this volume failed this request".
TRANSPORT_ERRORS = (OSError, Dropped, BadResponse, ValueError)


class Download:
    """A blob being read: `chunks()` yields its bytes; `close()` gives the connection
    back when the body was read to the end, and drops it otherwise."""

    def __init__(self, pool: Pool, conn: Connection, req: Request, length: int, closing: bool) -> None:
        self.pool = pool
        self.conn = conn
        self.req = req
        self.length = length
        self._closing = closing
        self._done = False

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        try:
            yield from self.conn.body_chunks(self.length, size)
        except TRANSPORT_ERRORS as exc:
            self.conn.close()
            raise volume_error(self.conn.volume, self.req, exc) from exc
        self._done = True

    def close(self) -> None:
        if self._done and not self._closing:
            self.pool.give(self.conn)
        else:
            self.conn.close()

    def __enter__(self) -> Download:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pool:
    """Idle connections per volume, shared by a process's threads; at most `max_idle`
    kept per volume (`put_stream` opens a new one each time, and those would pile up)."""

    def __init__(self, timeout: float, max_idle: int = 32, retry: Retry = Retry(),
                 on_request: Callable[[str, str], None] | None = None) -> None:
        self.timeout = timeout
        self.max_idle = max_idle
        self.retry = retry
        #: called with (volume, method) for each request asked of a volume (the service
        #: counts them for /-/metrics); a request sent again after a dropped connection
        #: is not asked again
        self.on_request = on_request
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

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()

    # --- small requests, pipelined ---

    def exchange(self, work: dict[str, list[Request]], ok: Container[int] = OK, *,
                 gone: Callable[[str], bool] | None = None, hedge: bool = False
                 ) -> dict[str, VolumeError]:
        """Send each volume its requests and check every answer's status; the errors,
        by volume (`gone` and `hedge` as in `ask`)."""
        return {vol: out for vol, out in self.ask(work, ok, gone=gone, hedge=hedge).items()
                if isinstance(out, VolumeError)}

    def ask(self, work: dict[str, list[Request]], ok: Container[int] = OK, *,
            gone: Callable[[str], bool] | None = None, hedge: bool = False
            ) -> dict[str, list[Reply] | VolumeError]:
        """Send each volume its requests (all volumes first, then read the answers), so
        the volumes work at once without a thread each. By volume: one Reply per
        request, or the error that stopped them (a status outside `ok` is an error).

        `gone(volume)`: the caller's word that a volume was marked down; waiting on it
        ends then, not at the timeout. `hedge`: waiting on a volume also ends once the
        others have all answered and it has taken far longer than they did (`Hedge`).
        Either way its error is a VolumeTimeout, sooner."""
        conns = {vol: self.take(vol) for vol in work}
        out: dict[str, list[Reply] | VolumeError] = {}
        if self.on_request is not None:
            for vol, reqs in work.items():
                for req in reqs:
                    self.on_request(vol, req.method)
        for vol, reqs in work.items():
            try:
                conns[vol].send(b"".join(conns[vol].encode(r) for r in reqs))
            except OSError:
                conns[vol].close()  # sent again below, on a new connection
        watch = Hedge(conns, out) if hedge else None
        for vol, reqs in work.items():
            conn = conns[vol]
            if gone is not None or watch is not None:
                conn.give_up = functools.partial(_give_up, vol, gone, watch)
            try:
                out[vol] = self._finish(conn, reqs, ok)
            except VolumeError as exc:
                conn.close()
                out[vol] = exc
            conn.give_up = None
            self.give(conn)
        return out

    def get_many(self, volume: str, paths: list[str], window: int = 64) -> list[Reply]:
        """GET every path from one volume, `window` requests per round trip; any status
        is an answer. Raises the VolumeError that stopped them."""
        replies: list[Reply] = []
        for i in range(0, len(paths), window):
            out = self.ask({volume: [Request("GET", p) for p in paths[i:i + window]]},
                           ok=range(100, 600))[volume]
            if isinstance(out, VolumeError):
                raise out
            replies += out
        return replies

    def remove_copies(self, key: str, volumes: Iterable[str], gen: str = "", *,
                      gone: Callable[[str], bool] | None = None) -> dict[str, VolumeError]:
        """Delete the copy of write `gen` of the key on each volume, sidecar then blob (pipelined: nginx runs
        them in order), all volumes at once; already gone counts as done. A copy half
        removed is a lone blob or a lone sidecar, neither of which a rebuild takes.
        The errors, by volume."""
        both = [Request("DELETE", sidecar_path(key, gen)), Request("DELETE", blob_path(key, gen))]
        return self.exchange({vol: both for vol in volumes}, ok=(200, 204, 404), gone=gone)

    def ping(self, volume: str) -> None:
        """Cheapest request that proves the volume serves HTTP: nginx's /-/ping, no disk IO."""
        error = self.exchange({volume: [Request("GET", "/-/ping")]}, ok=(200,)).get(volume)
        if error is not None:
            raise error

    def _finish(self, conn: Connection, reqs: list[Request], ok: Container[int]) -> list[Reply]:
        """Read the answers; send again what a closed connection lost (see Retry)."""
        pending = list(reqs)
        replies: list[Reply] = []
        failures = 0
        stale_retried = False
        while pending:
            try:
                if conn.sock is None:
                    conn.send(b"".join(conn.encode(r) for r in pending))
                while pending:
                    req = pending[0]
                    status, length, body, closing = conn.response(head_only=req.method == "HEAD")
                    pending.pop(0)
                    failures = 0
                    if status not in ok:
                        raise VolumeStatus(conn.volume, status, req.method, req.path)
                    replies.append(Reply(status, length, body))
                    if closing:  # nginx drops the rest of the pipeline: sent again above
                        conn.close()
                        break
            except TRANSPORT_ERRORS as exc:
                # a reset or an early close, not a timeout: a silent volume costs one timeout
                stale = (isinstance(exc, (Dropped, ConnectionError)) and conn.reused
                         and not replies and not stale_retried)
                conn.close()
                if stale:
                    stale_retried = True  # nginx closed the idle connection: once more
                    continue
                failures += 1
                if failures >= self.retry.attempts:
                    raise volume_error(conn.volume, pending[0], exc) from exc
                time.sleep(self.retry.pause(failures))
        return replies

    # --- streamed bodies ---

    def put_stream(self, volume: str, path: str, chunks: Iterable[bytes], length: int | None,
                   then: list[Request] | None = None,
                   give_up: Callable[[], bool] | None = None) -> None:
        """PUT a body read from `chunks`, then the small requests `then` pipelined behind
        it (a sidecar follows its blob with no round trip in between, and only once the
        whole body is sent). Whatever `chunks` raises passes through, with the connection
        closed so nginx drops the partial body; the volume's failures are VolumeErrors.

        `length` None sends the body chunked (its size is known only at its end): the
        last chunk goes out only once `chunks` has ended, so a body cut off for any
        reason never becomes a blob.

        The body cannot be sent twice, so it goes on a new connection: a kept-alive one
        that nginx has closed meanwhile is only found out once the body is gone."""
        then = then or []
        if self.on_request is not None:
            for method in ("PUT", *(r.method for r in then)):
                self.on_request(volume, method)
        conn = Connection(volume, self.timeout)
        conn.give_up = give_up  # e.g. the volume was marked down: stop waiting on it
        put = Request("PUT", path)

        def send(data: bytes) -> None:
            try:
                conn.send(data)
            except OSError as exc:
                raise volume_error(volume, put, exc) from exc

        try:
            send(conn.request_head("PUT", path, length))
            sent = 0
            for chunk in chunks:
                if length is None:
                    if not chunk:
                        continue  # an empty chunk would end the body
                    send(b"%x\r\n" % len(chunk))
                    send(chunk)
                    send(b"\r\n")
                else:
                    send(chunk)
                sent += len(chunk)
            if length is None:
                send(b"0\r\n\r\n")
            elif sent != length:
                raise ShortWrite(volume, f"PUT {path}: sent {sent} of {length} bytes")
            if then:
                send(b"".join(conn.encode(r) for r in then))
            # not a reused connection, so only `then` can be sent again, never the body
            self._finish(conn, [put, *then], OK)
        except BaseException:
            conn.close()
            raise
        conn.give_up = None
        self.give(conn)

    def download(self, volume: str, path: str) -> Download:
        """Start reading a blob (status 200 only); the caller reads `chunks()` and closes it."""
        req = Request("GET", path)
        if self.on_request is not None:
            self.on_request(volume, "GET")
        for attempt in range(2):
            conn = self.take(volume)
            try:
                conn.send(conn.encode(req))
                status, length, closing, _ = conn.read_head()
            except TRANSPORT_ERRORS as exc:
                stale = isinstance(exc, (Dropped, ConnectionError)) and conn.reused and attempt == 0
                conn.close()
                if stale:
                    continue
                raise volume_error(volume, req, exc) from exc
            if status != 200 or length < 0:
                conn.close()
                raise VolumeStatus(volume, status, "GET", path)
            return Download(self, conn, req, length, closing)
        raise AssertionError("unreachable")  # pragma: no cover


_END = object()
_ABORT = object()


class FanOut:
    """Stream one body to several volumes at once with bounded memory.

    Each replica's PUT runs in the executor (`Pool.put_stream`), pulling chunks from its
    own small queue; `send` blocks while the slowest replica is behind, so at most
    `depth` chunks per replica are ever held. Each runs in a copy of the caller's
    context, so the client request's id goes to the volumes (mkv.context). A `length`
    of None streams a body of unknown size, chunked: `finish` ends it, `abort` cuts it
    off, and nginx keeps only a body that was ended.
    """

    def __init__(self, pool: Pool, executor: Executor, volumes: list[str], path: str,
                 length: int | None, depth: int = 4,
                 gone: Callable[[str], bool] | None = None) -> None:
        self.volumes = volumes
        self.gone = gone
        self.length = length
        self.failed = threading.Event()
        self._queues: list[queue.Queue] = [queue.Queue(maxsize=depth) for _ in volumes]
        self._futures: list[Future] = [
            executor.submit(contextvars.copy_context().run, self._upload, pool, vol, path, q)
            for vol, q in zip(volumes, self._queues, strict=True)
        ]

    def _body(self, vol: str, q: queue.Queue) -> Iterator[bytes]:
        sent = 0
        while True:
            chunk = q.get()
            if chunk is _END:
                if self.length is not None and sent != self.length:
                    raise ShortWrite(vol, f"sent {sent} of {self.length} bytes")
                return
            if chunk is _ABORT:
                raise UploadAborted()
            sent += len(chunk)
            yield chunk

    def _upload(self, pool: Pool, vol: str, path: str, q: queue.Queue) -> None:
        try:
            give_up = functools.partial(self.gone, vol) if self.gone is not None else None
            pool.put_stream(vol, path, self._body(vol, q), self.length, give_up=give_up)
        except BaseException:
            self.failed.set()
            raise
        finally:
            self._drain(q)

    @staticmethod
    def _drain(q: queue.Queue) -> None:
        while True:
            try:
                q.get_nowait()
            except queue.Empty:
                return

    def _offer(self, item: object) -> None:
        for q, fut in zip(self._queues, self._futures, strict=True):
            while not fut.done():
                try:
                    q.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue

    def send(self, chunk: bytes) -> None:
        self._offer(chunk)

    def finish(self) -> list[BaseException | None]:
        """Close every body and wait; one entry per volume: None or the error."""
        self._offer(_END)
        return [fut.exception() for fut in self._futures]

    def abort(self) -> list[BaseException | None]:
        """Make every upload fail now, so nginx discards the partial bodies; one entry
        per volume, as `finish` (UploadAborted where the volume had not failed)."""
        self._offer(_ABORT)
        return [fut.exception() for fut in self._futures]
