"""The writer process: the only process that changes the index.

Workers send requests over a unix socket as length-prefixed JSON frames. The
writer is one thread around a selector: each turn it reads every request that
has arrived, runs them all in one transaction (group commit), commits, and only
then answers — so an answer means durable, and many concurrent PUTs cost one
commit. Key locks live here too, owned by the connection that took them, so a
worker that dies releases its locks when the kernel closes its socket.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import apsw

from mkv import index
from mkv.freshness import ChangeCount
from mkv.index import Record, State
from mkv.supervise import on_stop

log = logging.getLogger("mkv.writer")

_HEADER = struct.Struct("!I")
#: Requests that change the index; anything else runs outside a transaction.
WRITE_OPS = frozenset(("put", "state", "delete", "bulk"))
MAX_FRAME = 64 << 20
# socket.recv(n) allocates n bytes before it reads: a large n costs an mmap/munmap and
# page faults on every call (16 us against 3 us for a 200-byte answer at 256 KiB).
RECV_BYTES = 1 << 16


class WriterError(Exception):
    """The writer refused or failed a request; `code` says why."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class KeyLocked(WriterError):
    """Another request holds the key's lock (a write to it is in flight)."""

    def __init__(self, key: str) -> None:
        super().__init__("locked", key)


class WriterUnavailable(WriterError):
    """No writer answers on the socket (not started, restarting, or dead)."""

    def __init__(self, detail: str) -> None:
        super().__init__("unavailable", detail)


# --- framing ---------------------------------------------------------------------------


def encode_frame(obj: Any) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return _HEADER.pack(len(body)) + body


def split_frames(buf: bytearray) -> list[Any]:
    """Remove and decode every complete frame at the front of `buf`."""
    out = []
    while len(buf) >= _HEADER.size:
        (n,) = _HEADER.unpack_from(buf)
        if n > MAX_FRAME:
            raise WriterError("bad_request", f"frame of {n} bytes")
        if len(buf) < _HEADER.size + n:
            break
        out.append(json.loads(bytes(buf[_HEADER.size:_HEADER.size + n])))
        del buf[:_HEADER.size + n]
    return out


def record_to_wire(rec: Record | None) -> dict | None:
    if rec is None:
        return None
    return {"key": rec.key, "state": int(rec.state), "volumes": list(rec.volumes),
            "size": rec.size, "md5": rec.md5, "mtime": rec.mtime}


def record_from_wire(d: dict | None) -> Record | None:
    if d is None:
        return None
    return Record(d["key"], State(d["state"]), tuple(d["volumes"]), d["size"], d["md5"], d["mtime"])


# --- server ----------------------------------------------------------------------------


class _Conn:
    __slots__ = ("sock", "buf", "locks")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.locks: set[str] = set()


_WAKE = object()


class WriterServer:
    """Selector loop + group commit. Not thread-safe: one thread runs `serve`."""

    def __init__(self, db_path: str, socket_path: str, synchronous: str = "NORMAL",
                 changes: ChangeCount | None = None) -> None:
        self.db = index.open_index(db_path, synchronous=synchronous)
        # the workers' record caches (mkv.freshness): counted once now, for a commit
        # that a killed predecessor made but had not counted yet
        self.changes = changes
        if changes is not None:
            changes.bump()
        self.socket_path = socket_path
        self.locks: dict[str, _Conn] = {}
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.commits = 0
        self.committed_ops = 0
        self.started = time.time()
        self.listener = self._listen(socket_path)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        # `stop` writes a byte here so the loop ends now, not at the next select timeout
        self._wake, self._waker = socket.socketpair()
        self._waker.setblocking(False)
        self.sel.register(self._wake, selectors.EVENT_READ, _WAKE)

    @staticmethod
    def _listen(path: str) -> socket.socket:
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket of a dead writer
            else:
                probe.close()
                raise WriterError("busy", f"another writer is running on {path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = f"{path}.{os.getpid()}.tmp"
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(1024)
        os.rename(tmp, path)  # appears only once it accepts connections
        sock.setblocking(False)
        return sock

    def serve(self) -> None:
        while not self.stopping:
            batch: list[tuple[_Conn, dict]] = []
            for skey, _ in self.sel.select(timeout=0.5):
                if skey.data is None:
                    self._accept()
                elif skey.data is _WAKE:
                    continue
                else:
                    self._read(skey.data, batch)
            if batch:
                self._run_batch(batch)
        self.close()

    def stop(self) -> None:
        """End `serve` (from another thread or a signal handler)."""
        self.stopping = True
        try:
            self._waker.send(b"x")
        except OSError:
            pass  # already woken, or closed

    def close(self) -> None:
        for skey in list(self.sel.get_map().values()):
            skey.fileobj.close()
        self.sel.close()
        self._waker.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self.db.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, _Conn(sock))

    def _read(self, conn: _Conn, batch: list[tuple[_Conn, dict]]) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        conn.buf += data
        try:
            batch.extend((conn, req) for req in split_frames(conn.buf))
        except (WriterError, ValueError):
            log.warning("dropping a connection that sent a malformed frame")
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        """A closed connection gives up its locks: a killed worker leaves no key locked."""
        for key in conn.locks:
            if self.locks.get(key) is conn:
                del self.locks[key]
        conn.locks.clear()
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _release(self, conn: _Conn, key: str) -> None:
        if self.locks.get(key) is conn:
            del self.locks[key]
        conn.locks.discard(key)

    def _run_batch(self, batch: list[tuple[_Conn, dict]]) -> None:
        replies: list[tuple[_Conn, dict]] = []
        releases: list[tuple[_Conn, str]] = []
        writes = 0
        # a batch of only locks, unlocks and reads needs no transaction at all
        transact = any(req.get("op") in WRITE_OPS for _, req in batch)
        try:
            if transact:
                self.db.execute("BEGIN IMMEDIATE")
            for conn, req in batch:
                reply, release, wrote = self._apply(conn, req, transact)
                replies.append((conn, reply))
                if release:
                    releases.append((conn, release))
                writes += wrote
            if transact:
                self.db.execute("COMMIT")
        except apsw.Error as exc:
            log.error("commit failed: %s", exc)
            if not self.db.getautocommit():
                self.db.execute("ROLLBACK")
            replies = [(c, {"ok": False, "error": "db_error", "detail": str(exc)}) for c, _ in batch]
            releases = []
        else:
            if writes:
                self.commits += 1
                self.committed_ops += writes
        if transact and self.changes is not None:
            self.changes.bump()  # before any reply: a client told "done" never reads older
        for conn, key in releases:
            self._release(conn, key)
        for conn, reply in replies:
            if conn.sock.fileno() < 0:
                continue
            try:
                conn.sock.sendall(encode_frame(reply))
            except (BlockingIOError, OSError):
                self._drop(conn)

    def _apply(self, conn: _Conn, req: dict, transact: bool) -> tuple[dict, str | None, int]:
        """Run one request inside the batch; a failing one rolls back only itself."""
        op = req.get("op")
        handler: Callable | None = getattr(self, f"_op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "error": "bad_request", "detail": f"unknown op {op!r}"}, None, 0
        if transact:
            self.db.execute("SAVEPOINT op")
        try:
            reply, release, wrote = handler(conn, req)
        except WriterError as exc:
            reply, release, wrote = {"ok": False, "error": exc.code, "detail": exc.detail}, None, 0
        except (KeyError, TypeError, ValueError, apsw.ConstraintError) as exc:
            reply, release, wrote = {"ok": False, "error": "bad_request", "detail": repr(exc)}, None, 0
        else:
            if transact:
                self.db.execute("RELEASE op")
            return reply, release, wrote
        if transact:
            self.db.execute("ROLLBACK TO op")
            self.db.execute("RELEASE op")
        return reply, release, wrote

    def _need_lock(self, conn: _Conn, req: dict) -> None:
        """The request's connection must hold the key's lock.

        With `acquire`, a free lock is taken on the spot: that is how a client
        retries a write after its connection (and so its lock) was lost.
        """
        key = req["key"]
        holder = self.locks.get(key)
        if holder is None and req.get("acquire"):
            self.locks[key] = conn
            conn.locks.add(key)
            return
        if holder is None:
            raise WriterError("not_locked", key)
        if holder is not conn:
            raise KeyLocked(key)

    def _done(self, conn: _Conn, req: dict, **extra: Any) -> tuple[dict, str | None, int]:
        release = None if req.get("keep_lock") else req["key"]
        return {"ok": True, **extra}, release, 1

    # ops: each returns (reply, key to unlock after the commit, number of writes)

    def _op_ping(self, conn: _Conn, req: dict) -> tuple[dict, None, int]:
        return {"ok": True, "pid": os.getpid(), "commits": self.commits,
                "committed_ops": self.committed_ops, "locks": len(self.locks),
                "uptime": time.time() - self.started}, None, 0

    def _op_lock(self, conn: _Conn, req: dict) -> tuple[dict, None, int]:
        key = req["key"]
        if key in self.locks:
            raise KeyLocked(key)
        self.locks[key] = conn
        conn.locks.add(key)
        return {"ok": True, "record": record_to_wire(index.read_record(self.db, key))}, None, 0

    def _op_unlock(self, conn: _Conn, req: dict) -> tuple[dict, str, int]:
        return {"ok": True}, req["key"], 0

    def _op_put(self, conn: _Conn, req: dict) -> tuple[dict, str | None, int]:
        """Write a record. `expect` (a whole record) makes it a compare-and-set: written
        only over exactly that record (rebalance); a retry that finds its own write is
        done. Whole, not just the volumes: a client PUT that slipped in while a writer
        restart dropped the lock may have the same volumes and other bytes."""
        key = req["key"]
        self._need_lock(conn, req)
        rec = Record(key, State(req.get("state", State.LIVE)), tuple(req["volumes"]),
                     int(req["size"]), str(req["md5"]), float(req.get("mtime") or time.time()))
        checked = "expect" in req or req.get("guard") == "new"
        cur = index.read_record(self.db, key) if checked else None
        if "expect" in req and cur != record_from_wire(req["expect"]):
            if cur == rec:  # a retried compare-and-set finds its own write: already done
                return self._done(conn, req)
            raise WriterError("conflict", key)
        if req.get("guard") == "new" and cur is not None and cur.state is State.LIVE:
            if cur != rec:  # a retried PUT finds its own record: already done
                raise WriterError("conflict", key)
            return self._done(conn, req)
        index.write_record(self.db, rec)
        return self._done(conn, req)

    def _op_state(self, conn: _Conn, req: dict) -> tuple[dict, str | None, int]:
        """Change a record's state (its mtime becomes now); the answer carries the new
        record. With `expect`, only exactly that record's; a retry that finds the
        change made (the same record in the new state, a newer mtime) is done."""
        key, state = req["key"], State(req["state"])
        self._need_lock(conn, req)
        if "expect" in req:
            cur = index.read_record(self.db, key)
            expected = record_from_wire(req["expect"])
            if cur != expected:
                if expected is None or cur is None or dataclasses.replace(
                        cur, mtime=expected.mtime) != dataclasses.replace(expected, state=state):
                    raise WriterError("conflict", key)
                return self._done(conn, req, record=record_to_wire(cur))
        if not index.write_state(self.db, key, state):
            raise WriterError("not_found", key)
        return self._done(conn, req, record=record_to_wire(index.read_record(self.db, key)))

    def _op_delete(self, conn: _Conn, req: dict) -> tuple[dict, str | None, int]:
        """Delete a record; with `expect`, only exactly that one (gone already: done)."""
        self._need_lock(conn, req)
        if "expect" in req:
            cur = index.read_record(self.db, req["key"])
            if cur is not None and cur != record_from_wire(req["expect"]):
                raise WriterError("conflict", req["key"])
        index.write_delete(self.db, req["key"])
        return self._done(conn, req)

    def _op_bulk(self, conn: _Conn, req: dict) -> tuple[dict, None, int]:
        """Insert many records at once (rebuild); refuses keys someone holds locked."""
        recs = [record_from_wire(d) for d in req["records"]]
        for rec in recs:
            if rec.key in self.locks:
                raise KeyLocked(rec.key)
        index.write_records(self.db, recs)
        return {"ok": True, "count": len(recs)}, None, len(recs)


# --- client ----------------------------------------------------------------------------


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

    def lock(self, key: str, *, retry: bool = False) -> Record | None:
        """Take the key's lock; returns its current record (None if absent)."""
        return record_from_wire(self.call(op="lock", key=key, retry=retry)["record"])

    def unlock(self, key: str) -> None:
        self.call(op="unlock", key=key)

    def release(self, key: str) -> None:
        """Give the key's lock back on the way out of a failed operation, never raising:
        if the writer cannot be told, the connection is closed, and a lock dies with the
        connection that took it (a writer that restarted holds none to begin with)."""
        try:
            self.unlock(key)
        except Exception:  # noqa: BLE001 - closing releases it just the same
            self.close()

    def put(self, rec: Record, *, keep_lock: bool = False, retry: bool = False,
            expect: Record | None = None, new: bool = False) -> None:
        """Write `rec`. `new`: only if the key is not live (or is live as exactly `rec`,
        which is what a retry after a lost answer finds). `expect`: only over exactly
        that record (or, again, where `rec` is already)."""
        req: dict[str, Any] = {"op": "put", "key": rec.key, "state": int(rec.state),
                               "volumes": list(rec.volumes), "size": rec.size, "md5": rec.md5,
                               "mtime": rec.mtime, "keep_lock": keep_lock}
        if expect is not None:
            req["expect"] = record_to_wire(expect)
        if new:
            req["guard"] = "new"
        self.call(retry=retry, **req)

    def set_state(self, key: str, state: State, *, keep_lock: bool = False,
                  retry: bool = False, expect: Record | None = None) -> Record | None:
        """Change the key's state; with `expect`, only if its record is exactly that.
        Returns the record as changed (its mtime is the writer's)."""
        req: dict[str, Any] = {"op": "state", "key": key, "state": int(state),
                               "keep_lock": keep_lock}
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

    def bulk(self, recs: list[Record]) -> int:
        return self.call(op="bulk", records=[record_to_wire(r) for r in recs])["count"]

    def ping(self) -> dict:
        return self.call(op="ping")


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


# --- process entry point ---------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m mkv.writer --db PATH --socket PATH`: started by `mkv serve`'s hooks."""
    parser = argparse.ArgumentParser(prog="mkv-writer")
    parser.add_argument("--db", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--synchronous", default="NORMAL")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--parent", type=int, default=0, help="supervising master's pid")
    parser.add_argument("--changes-fd", type=int, default=-1,
                        help="the workers' shared change count (mkv.freshness), if any")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s [%(process)d] [writer] %(levelname)s %(message)s")
    try:
        changes = ChangeCount(args.changes_fd) if args.changes_fd >= 0 else None
        server = WriterServer(args.db, args.socket, args.synchronous, changes)
    except (WriterError, apsw.Error, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1

    on_stop(server.stop, args.parent)
    log.info("writing %s, listening on %s", args.db, args.socket)
    server.serve()
    log.info("stopped after %d commits of %d writes", server.commits, server.committed_ops)
    return 0


def serve_in_thread(db_path: str, socket_path: str) -> tuple[WriterServer, threading.Thread]:
    """Run a writer inside this process (tests and the tools' offline mode)."""
    server = WriterServer(db_path, socket_path)
    thread = threading.Thread(target=server.serve, name="mkv-writer", daemon=True)
    thread.start()
    return server, thread


if __name__ == "__main__":
    sys.exit(main())
