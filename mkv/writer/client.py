"""A connection to the writer process, for workers, the health process and the tools.
Use one per thread: key locks belong to the connection that took them."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from mkv.model import Pending, Record, State
from mkv.writer.protocol import (
    RECV_BYTES,
    KeyLocked,
    LockLost,
    WriterError,
    WriterUnavailable,
    encode_frame,
    record_from_wire,
    record_to_wire,
    split_frames,
)


class WriterClient:
    """One connection to the writer. Use one per thread: locks belong to the connection."""

    def __init__(self, socket_path: str, timeout: float = 30.0, retry_for: float = 15.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.retry_for = retry_for
        self._sock: socket.socket | None = None
        self._buf = bytearray()

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                sock.close()
                raise WriterUnavailable(f"{self.socket_path}: {exc}") from exc
            self._sock = sock
            self._buf.clear()
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(self, retry: bool = False, **req: Any) -> dict:
        """Send one request and wait for its answer; raise a typed error if refused.

        With `retry`, a lost writer (killed, restarting) is waited for up to
        `retry_for` seconds and the request sent again with `acquire`, since the
        lock died with the old connection. Only idempotent requests may retry.
        """
        try:
            return self._call_once(req)
        except WriterUnavailable:
            if not retry:
                raise
        deadline = time.monotonic() + self.retry_for
        pause = 0.05
        while True:
            time.sleep(pause)
            try:
                return self._call_once({**req, "acquire": True})
            except WriterUnavailable:
                if time.monotonic() + pause > deadline:
                    raise
                pause = min(pause * 2, 1.0)

    def _call_once(self, req: dict) -> dict:
        sock = self._connect()
        try:
            sock.sendall(encode_frame(req))
            while True:
                frames = split_frames(self._buf)
                if frames:
                    reply = frames[0]
                    break
                data = sock.recv(RECV_BYTES)
                if not data:
                    raise OSError("writer closed the connection")
                self._buf += data
        except OSError as exc:
            self.close()
            raise WriterUnavailable(str(exc)) from exc
        if not reply.get("ok"):
            code = reply.get("error", "error")
            if code == "locked":
                raise KeyLocked(reply.get("detail", ""))
            raise WriterError(code, reply.get("detail", ""))
        return reply

    # conveniences that name the protocol's operations

    def lock(self, key: str, *, retry: bool = False, intend: Sequence[str] = (),
             gen: str = "") -> Record | None:
        """Take the key's lock; returns its current record (None if absent). `intend`: the
        volumes a PUT is about to write, recorded in the same commit unless the key is
        live (docs/design.md, "Pending operations"); `gen` is the write's generation."""
        req: dict[str, Any] = {"op": "lock", "key": key}
        if intend:
            req["intend"], req["gen"] = list(intend), gen
        return record_from_wire(self.call(retry=retry, **req)["record"])

    def intend(self, key: str, gen: str, volumes: Sequence[str], *, retry: bool = False) -> None:
        """More volumes write `gen` under this lock may put copies on, before it does."""
        self.call(op="intend", key=key, gen=gen, volumes=list(volumes), retry=retry)

    def pending_done(self, item: Pending) -> None:
        """A pending operation was carried out or found needless; releases the lock."""
        self.call(op="pending_done", key=item.key, gen=item.gen, volume=item.volume,
                  pending_op=int(item.op))

    # the repair queue and volume identities (docs/design.md, "Self-healing"): no key lock

    def volume_id(self, volume: str, vid: str, found: str = "") -> None:
        """Record the id the index expects on `volume`'s disk (and another found there)."""
        self.call(op="volume_id", volume=volume, id=vid, found=found)

    def repair_volume(self, volume: str, reason: str) -> int:
        """Queue every key with a copy on `volume`; how many were queued."""
        return int(self.call(op="repair_volume", volume=volume, reason=reason)["queued"])

    def repair_queue(self, items: Sequence[tuple[str, str]], reason: str) -> None:
        """Queue (key, volume) copies for repair (volume '' when not known)."""
        self.call(op="repair_queue", items=[list(i) for i in items], reason=reason)

    def repair_done(self, key: str) -> None:
        self.call(op="repair_done", key=key)

    def repair_failed(self, key: str, error: str, retry_after: float) -> None:
        self.call(op="repair_failed", key=key, error=error, retry_after=retry_after)

    def unlock(self, key: str, gen: str = "") -> None:
        """Give the lock back; `gen`: the write under it is over, its intents are due."""
        self.call(op="unlock", key=key, **({"gen": gen} if gen else {}))

    def release(self, key: str, gen: str = "") -> None:
        """Give the key's lock back on the way out of a failed operation, never raising:
        if the writer cannot be told, the connection is closed, and a lock dies with the
        connection that took it (a writer that restarted holds none to begin with).
        `gen`: a failed PUT's generation, whose copies become due for removal."""
        try:
            self.unlock(key, gen)
        except Exception:  # noqa: BLE001 - closing releases it just the same
            self.close()

    def put(self, rec: Record, *, keep_lock: bool = False, retry: bool = False,
            expect: Record | None = None, new: bool = False, intent: bool = False) -> None:
        """Write `rec`. `new`: only if the key is not live (or is live as exactly `rec`,
        which is what a retry after a lost answer finds). `expect`: only over exactly
        that record (or, again, where `rec` is already). `intent`: the write recorded its
        intent at `lock`; its copies must still be its own, and the ones `rec` does not
        name become due for removal."""
        req: dict[str, Any] = {"op": "put", "key": rec.key, "state": int(rec.state),
                               "volumes": list(rec.volumes), "size": rec.size, "md5": rec.md5,
                               "mtime": rec.mtime, "gen": rec.gen, "keep_lock": keep_lock}
        if expect is not None:
            req["expect"] = record_to_wire(expect)
        if new:
            req["guard"] = "new"
        if intent:
            req["intent"] = True
        self.call(retry=retry, **req)

    def set_state(self, key: str, state: State, *, keep_lock: bool = False,
                  retry: bool = False, expect: Record | None = None,
                  mark: Sequence[str] = ()) -> Record | None:
        """Change the key's state; with `expect`, only if its record is exactly that.
        `mark`: volumes whose sidecar is still to be marked unlinked (a pending operation).
        Returns the record as changed (its mtime is the writer's)."""
        req: dict[str, Any] = {"op": "state", "key": key, "state": int(state),
                               "keep_lock": keep_lock}
        if mark:
            req["mark"] = list(mark)
        if expect is not None:
            req["expect"] = record_to_wire(expect)
        return record_from_wire(self.call(retry=retry, **req)["record"])

    def delete(self, key: str, *, keep_lock: bool = False, retry: bool = False,
               expect: Record | None = None) -> None:
        """Delete the key's record; with `expect`, only if it is exactly that one."""
        req: dict[str, Any] = {"op": "delete", "key": key, "keep_lock": keep_lock}
        if expect is not None:
            req["expect"] = record_to_wire(expect)
        self.call(retry=retry, **req)

    def held(self, key: str) -> None:
        """Raise LockLost unless this connection still holds the key's lock: a writer
        restart drops every lock, and a client may have written the key since."""
        try:
            self.call(op="held", key=key)
        except WriterError as exc:
            self.close()
            raise LockLost(f"the lock of {key!r} was lost ({exc})") from exc

    def bulk(self, recs: list[Record]) -> int:
        return self.call(op="bulk", records=[record_to_wire(r) for r in recs])["count"]

    def configure(self, synchronous: str, log_level: str) -> None:
        """A running writer takes the reloaded durability and log level."""
        self.call(op="configure", synchronous=synchronous, log_level=log_level)

    def ping(self) -> dict:
        return self.call(op="ping")


class ThreadClients:
    """One WriterClient per thread (key locks belong to a connection, so threads never
    share one), made by `make` on first use."""

    def __init__(self, make: Callable[[], WriterClient]) -> None:
        self.make = make
        self._local = threading.local()

    def get(self) -> WriterClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.make()
        return client


def wait_ready(socket_path: str, timeout: float = 10.0) -> dict:
    """Block until a writer answers a ping on `socket_path`."""
    deadline = time.monotonic() + timeout
    while True:
        client = WriterClient(socket_path, timeout=1.0)
        try:
            return client.ping()
        except WriterUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
        finally:
            client.close()
