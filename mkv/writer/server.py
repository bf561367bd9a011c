"""The writer process's server: the only code that changes the index.

Workers send requests over a unix socket as length-prefixed JSON frames. The writer is
one thread around a selector: each turn it reads every request that has arrived, runs
them all in one transaction (group commit), commits, and only then answers, so an
answer means durable and many concurrent PUTs cost one commit. Key locks live here too,
owned by the connection that took them, so a worker that dies releases its locks when
the kernel closes its socket. docs/design.md, "Writer", has the protocol.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import apsw

from mkv import core
from mkv.core import Cas
from mkv.index import schema
from mkv.index.cache import ChangeCount
from mkv.keys import GEN_RE
from mkv.model import Pending, PendingOp, PendingState, Record, State
from mkv.writer import metrics
from mkv.writer.lockfile import WriterLock
from mkv.writer.protocol import (
    RECV_BYTES,
    WRITE_OPS,
    KeyLocked,
    WriterError,
    encode_frame,
    record_from_wire,
    record_to_wire,
    split_frames,
)

log = logging.getLogger("mkv.writer")

class _Conn:
    __slots__ = ("sock", "buf", "locks", "intents")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.locks: set[str] = set()
        self.intents: dict[str, str] = {}  # key -> generation of this connection's write


_WAKE = object()


def _check_gen(gen: str) -> str:
    """A generation names files on every volume: only what keys.GEN_RE allows ("" is
    the legacy name)."""
    if gen and not GEN_RE.fullmatch(gen):
        raise WriterError("bad_request", f"bad generation {gen!r}")
    return gen


class WriterServer:
    """Selector loop + group commit. Not thread-safe: one thread runs `serve`."""

    def __init__(self, db_path: str, socket_path: str, synchronous: str = "NORMAL",
                 changes: ChangeCount | None = None) -> None:
        self.lock = WriterLock(db_path)  # first: one writer per index (mkv.writer.lockfile)
        try:
            self.db = schema.open_index(db_path, synchronous=synchronous)
        except BaseException:
            self.lock.release()
            raise
        # the workers' record caches (mkv.index.cache): counted once now, for a commit
        # that a killed predecessor made but had not counted yet
        self.changes = changes
        if changes is not None:
            changes.bump()
        # the intents of a writer before this one have no owner now (docs/design.md,
        # "Pending operations"): the health process makes them due after a grace period
        schema.orphan_intents(self.db, time.time())
        self.socket_path = socket_path
        self.locks: dict[str, _Conn] = {}
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.commits = 0
        self.committed_ops = 0
        self.started = time.time()
        self._synchronous = ""  # a reload's new setting, applied after the batch
        self.listener = self._listen(socket_path)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        # `stop` writes a byte here so the loop ends now, not at the next select timeout
        self._wake, self._waker = socket.socketpair()
        self._waker.setblocking(False)
        self.sel.register(self._wake, selectors.EVENT_READ, _WAKE)

    @staticmethod
    def _listen(path: str) -> socket.socket:
        """Listen on `path`; a socket file already there is a dead writer's (this process
        holds the index's writer lock), replaced atomically."""
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
            if self._synchronous:
                self.db.execute(f"PRAGMA synchronous={self._synchronous}")
                log.info("synchronous is now %s", self._synchronous)
                self._synchronous = ""
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
        self.lock.release()

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
        """A closed connection gives up its locks (a killed worker leaves no key locked),
        and the copies its unfinished writes may have made become due for removal."""
        if conn.intents:
            try:
                with self.db:
                    for key, gen in conn.intents.items():
                        schema.activate_intents(self.db, key, gen, time.time())
            except apsw.Error as exc:  # they stay intents; orphaned at the next start
                log.error("could not queue the copies of a dropped connection: %s", exc)
            conn.intents.clear()
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
        transact = any(self._writes(conn, req) for conn, req in batch)
        began = time.perf_counter()
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
                metrics.committed(len(batch), time.perf_counter() - began)
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
            if isinstance(exc, KeyLocked):
                metrics.lock_conflict()
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

    @staticmethod
    def _writes(conn: _Conn, req: dict) -> bool:
        """Does this request change the index (and so need the batch's transaction)?"""
        op = req.get("op")
        return (op in WRITE_OPS or (op == "lock" and bool(req.get("intend")))
                or (op == "unlock" and (bool(req.get("gen")) or req.get("key") in conn.intents)))

    def _intend(self, conn: _Conn, key: str, gen: str, volumes: list[str]) -> int:
        """Record that write `gen` of `key` may put copies on `volumes` (before it does)."""
        _check_gen(gen)
        now = time.time()
        schema.write_pending(self.db, [
            Pending(key, v, PendingOp.REMOVE, PendingState.INTENT, now, gen) for v in volumes])
        conn.intents[key] = gen
        return len(volumes)

    def _op_lock(self, conn: _Conn, req: dict) -> tuple[dict, None, int]:
        """Take the key's lock; with `intend` (volumes), also record the write's intent,
        unless the key is live (the PUT will be refused: it writes nothing)."""
        key = req["key"]
        if key in self.locks:
            raise KeyLocked(key)
        record = schema.read_record(self.db, key)
        wrote = 0
        if req.get("intend") and (record is None or record.state is not State.LIVE):
            wrote = self._intend(conn, key, str(req["gen"]), list(req["intend"]))
        self.locks[key] = conn
        conn.locks.add(key)
        return {"ok": True, "record": record_to_wire(record)}, None, wrote

    def _op_intend(self, conn: _Conn, req: dict) -> tuple[dict, None, int]:
        """More volumes a write may touch (a replica re-placed after a failure)."""
        self._need_lock(conn, req)
        return {"ok": True}, None, self._intend(conn, req["key"], str(req["gen"]),
                                                list(req["volumes"]))

    def _op_unlock(self, conn: _Conn, req: dict) -> tuple[dict, str, int]:
        """Give the lock back; a write that ends here recorded nothing, so the copies it
        intended become due for removal."""
        key = req["key"]
        # the write's generation: this connection's, or named by a client whose connection
        # (and lock) a writer restart took; only that write knows it
        gen = conn.intents.pop(key, None) or req.get("gen")
        if gen:
            schema.activate_intents(self.db, key, str(gen), time.time())
            return {"ok": True}, key, 1
        return {"ok": True}, key, 0

    def _op_pending_done(self, conn: _Conn, req: dict) -> tuple[dict, str | None, int]:
        """A pending operation was carried out (or found needless) under the key's lock."""
        self._need_lock(conn, req)
        schema.delete_pending(self.db, req["key"], str(req.get("gen", "")), [req["volume"]],
                              PendingOp(req["pending_op"]))
        return self._done(conn, req)

    def _op_put(self, conn: _Conn, req: dict) -> tuple[dict, str | None, int]:
        """Write a record; `expect` and `guard` make it a compare-and-set (core.put_cas)."""
        key = req["key"]
        self._need_lock(conn, req)
        rec = Record(key, State(req.get("state", State.LIVE)), tuple(req["volumes"]),
                     int(req["size"]), str(req["md5"]), float(req.get("mtime") or time.time()),
                     _check_gen(str(req.get("gen", ""))))
        checked, guard_new = "expect" in req, req.get("guard") == "new"
        cur = schema.read_record(self.db, key) if checked or guard_new else None
        verdict = core.put_cas(cur, rec, expect=record_from_wire(req.get("expect")),
                               checked=checked, guard_new=guard_new)
        if verdict is Cas.WRITE and req.get("intent"):
            # the copies must still be the write's own: after a writer restart the health
            # process may have made them due (and removed them) while the upload went on
            if not core.intents_cover(schema.read_pending(self.db, key), rec):
                verdict = Cas.CONFLICT
        if verdict is Cas.CONFLICT:
            raise WriterError("conflict", key)
        if verdict is Cas.WRITE:
            schema.write_record(self.db, rec)
            if req.get("intent"):
                now = time.time()
                schema.delete_pending(self.db, key, rec.gen, rec.volumes, PendingOp.REMOVE)
                schema.activate_intents(self.db, key, rec.gen, now)
                conn.intents.pop(key, None)
                schema.write_pending(self.db, [
                    Pending(key, v, PendingOp.REMOVE, PendingState.DUE, now, cur.gen)
                    for v in core.replaced_copies(cur, rec)])
        return self._done(conn, req)

    def _op_state(self, conn: _Conn, req: dict) -> tuple[dict, str | None, int]:
        """Change a record's state (its mtime becomes now); the answer carries the record
        as changed. With `expect`, a compare-and-set (core.state_cas)."""
        key, state = req["key"], State(req["state"])
        self._need_lock(conn, req)
        if "expect" in req:
            cur = schema.read_record(self.db, key)
            verdict = core.state_cas(cur, state, expect=record_from_wire(req["expect"]), checked=True)
            if verdict is Cas.CONFLICT:
                raise WriterError("conflict", key)
            if verdict is Cas.DONE:
                return self._done(conn, req, record=record_to_wire(cur))
        if not schema.write_state(self.db, key, state):
            raise WriterError("not_found", key)
        if req.get("mark"):  # sidecars that could not be marked unlinked yet
            now = time.time()
            gen = schema.read_record(self.db, key).gen
            schema.write_pending(self.db, [
                Pending(key, v, PendingOp.MARK_UNLINKED, PendingState.DUE, now, gen)
                for v in req["mark"]])
        return self._done(conn, req, record=record_to_wire(schema.read_record(self.db, key)))

    def _op_delete(self, conn: _Conn, req: dict) -> tuple[dict, str | None, int]:
        """Delete a record; with `expect`, a compare-and-set (core.delete_cas)."""
        self._need_lock(conn, req)
        if "expect" in req:
            cur = schema.read_record(self.db, req["key"])
            if core.delete_cas(cur, expect=record_from_wire(req["expect"]), checked=True) is Cas.CONFLICT:
                raise WriterError("conflict", req["key"])
        schema.write_delete(self.db, req["key"])
        return self._done(conn, req)

    def _op_configure(self, conn: _Conn, req: dict) -> tuple[dict, None, int]:
        """Settings a reload of the service changes in a running writer (docs/design.md,
        "Reload"): the index's durability and the log level."""
        synchronous = str(req.get("synchronous", "")).upper()
        if synchronous:
            if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
                raise WriterError("bad_request", f"synchronous {synchronous!r}")
            self._synchronous = synchronous  # set between batches: never inside a transaction
        level = str(req.get("log_level", "")).upper()
        if level:
            logging.getLogger().setLevel(level)
        return {"ok": True}, None, 0

    def _op_held(self, conn: _Conn, req: dict) -> tuple[dict, None, int]:
        """Does this connection still hold the key's lock? (not_locked if not): asked
        before copies are removed, since a writer restart drops every lock."""
        self._need_lock(conn, {"key": req["key"]})
        return {"ok": True}, None, 0

    # self-healing bookkeeping (docs/design.md, "Self-healing"): no key lock, since a
    # queue row only asks for work that is done under the lock later

    def _op_volume_id(self, conn: _Conn, req: dict) -> tuple[dict, None, int]:
        schema.write_volume_id(self.db, str(req["volume"]), str(req["id"]), str(req.get("found", "")))
        return {"ok": True}, None, 1

    def _op_repair_volume(self, conn: _Conn, req: dict) -> tuple[dict, None, int]:
        n = schema.queue_volume(self.db, str(req["volume"]), str(req["reason"]))
        return {"ok": True, "queued": n}, None, 1

    def _op_repair_queue(self, conn: _Conn, req: dict) -> tuple[dict, None, int]:
        items = [(str(k), str(v)) for k, v in req["items"]]
        schema.queue_repair(self.db, items, str(req["reason"]))
        return {"ok": True}, None, 1

    def _op_repair_done(self, conn: _Conn, req: dict) -> tuple[dict, None, int]:
        schema.repair_done(self.db, str(req["key"]))
        return {"ok": True}, None, 1

    def _op_repair_failed(self, conn: _Conn, req: dict) -> tuple[dict, None, int]:
        schema.repair_failed(self.db, str(req["key"]), str(req["error"]), float(req["retry_after"]))
        return {"ok": True}, None, 1

    def _op_bulk(self, conn: _Conn, req: dict) -> tuple[dict, None, int]:
        """Insert many records at once (rebuild); refuses keys someone holds locked."""
        recs = [record_from_wire(d) for d in req["records"]]
        for rec in recs:
            if rec.key in self.locks:
                raise KeyLocked(rec.key)
        schema.write_records(self.db, recs)
        return {"ok": True, "count": len(recs)}, None, len(recs)


def serve_in_thread(db_path: str, socket_path: str) -> tuple[WriterServer, threading.Thread]:
    """Run a writer inside this process (tests and the tools' offline mode)."""
    server = WriterServer(db_path, socket_path)
    thread = threading.Thread(target=server.serve, name="mkv-writer", daemon=True)
    thread.start()
    return server, thread
