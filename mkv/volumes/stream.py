"""Streamed transfers over urllib3: a large PUT fanned out to R volumes, a blob read in
chunks, the health probe."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from mkv.volumes.errors import ShortWrite, UploadAborted, VolumeStatus, VolumeTimeout, VolumeUnreachable


def url(volume: str, path: str) -> str:
    return f"http://{volume}{path}"


class VolumePool:
    """HTTP to volumes with per-host keep-alive pools; opened after fork, never inherited."""

    def __init__(self, timeout: float, maxsize: int = 32) -> None:
        self.timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self.http = urllib3.PoolManager(num_pools=64, maxsize=maxsize, block=False,
                                        retries=False, timeout=self.timeout)

    def _request(self, volume: str, method: str, path: str, *, ok: Iterable[int],
                 body: bytes | Iterable[bytes] | None = None, headers: dict | None = None,
                 preload: bool = True) -> urllib3.BaseHTTPResponse:
        try:
            resp = self.http.request(method, url(volume, path), body=body, headers=headers,
                                     preload_content=preload, redirect=False)
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            raise VolumeTimeout(volume, f"{method} {path}: timed out") from exc
        except UploadAborted:
            raise
        except (NewConnectionError, ProtocolError, HTTPError, OSError) as exc:
            cause = exc.__context__ if isinstance(exc.__context__, UploadAborted) else None
            if cause is not None:
                raise cause from None
            raise VolumeUnreachable(volume, f"{method} {path}: {exc}") from exc
        if resp.status not in ok:
            if not preload:
                resp.release_conn()
            raise VolumeStatus(volume, resp.status, method, path)
        return resp

    def put(self, volume: str, path: str, body: bytes | Iterable[bytes], length: int) -> None:
        """PUT a file; nginx answers 201 for a new file and 204 for an overwrite."""
        self._request(volume, "PUT", path, ok=(200, 201, 204), body=body,
                      headers={"Content-Length": str(length)})

    def stream(self, volume: str, path: str) -> urllib3.BaseHTTPResponse:
        """An open response to read in chunks; the caller must release it."""
        return self._request(volume, "GET", path, ok=(200,), preload=False)

    def ping(self, volume: str) -> None:
        """Cheapest request that proves the volume serves HTTP: nginx's /-/ping, no disk IO."""
        self._request(volume, "GET", "/-/ping", ok=(200,))


_END = object()


_ABORT = object()


class FanOut:
    """Stream one body to several volumes at once with bounded memory.

    Each replica's PUT runs in the executor, pulling chunks from its own small
    queue; `send` blocks while the slowest replica is behind, so at most
    `depth` chunks per replica are ever held.
    """

    def __init__(self, pool: VolumePool, executor: Executor, volumes: list[str], path: str,
                 length: int, depth: int = 4) -> None:
        self.volumes = volumes
        self.length = length
        self.failed = threading.Event()
        self._queues: list[queue.Queue] = [queue.Queue(maxsize=depth) for _ in volumes]
        self._futures: list[Future] = [
            executor.submit(self._upload, pool, vol, path, q)
            for vol, q in zip(volumes, self._queues, strict=True)
        ]

    def _body(self, vol: str, q: queue.Queue) -> Iterator[bytes]:
        sent = 0
        while True:
            chunk = q.get()
            if chunk is _END:
                if sent != self.length:
                    raise ShortWrite(vol, f"sent {sent} of {self.length} bytes")
                return
            if chunk is _ABORT:
                raise UploadAborted()
            sent += len(chunk)
            yield chunk

    def _upload(self, pool: VolumePool, vol: str, path: str, q: queue.Queue) -> None:
        try:
            pool.put(vol, path, self._body(vol, q), self.length)
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

    def abort(self) -> None:
        """Make every upload fail now, so nginx discards the partial bodies."""
        self._offer(_ABORT)
        for fut in self._futures:
            fut.exception()
