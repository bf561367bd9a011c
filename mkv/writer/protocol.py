"""The writer's wire protocol: length-prefixed JSON frames, records on the wire, and
the typed errors a request can get. Shared by the writer server and its clients."""

from __future__ import annotations

import json
import struct
from typing import Any

from mkv.model import Record, State

_HEADER = struct.Struct("!I")


#: Requests that change the index; anything else runs outside a transaction.
WRITE_OPS = frozenset(("put", "state", "delete", "bulk", "intend", "pending_done",
                       "volume_id", "repair_volume", "repair_queue", "repair_done",
                       "repair_failed"))


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

    @property
    def refused(self) -> bool:
        """Refused for certain because another write holds or changed the key (a lock
        taken, a record that is not the one expected, a lock a writer restart took):
        nothing of this request was committed."""
        return self.code in ("conflict", "locked", "lock_lost")


class KeyLocked(WriterError):
    """Another request holds the key's lock (a write to it is in flight)."""

    def __init__(self, key: str) -> None:
        super().__init__("locked", key)


class LockLost(WriterError):
    """This connection no longer holds a key lock it took (the writer restarted)."""

    def __init__(self, detail: str) -> None:
        super().__init__("lock_lost", detail)


class WriterUnavailable(WriterError):
    """No writer answers on the socket (not started, restarting, or dead)."""

    def __init__(self, detail: str) -> None:
        super().__init__("unavailable", detail)


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
            "size": rec.size, "md5": rec.md5, "mtime": rec.mtime, "gen": rec.gen}


def record_from_wire(d: dict | None) -> Record | None:
    if d is None:
        return None
    return Record(d["key"], State(d["state"]), tuple(d["volumes"]), d["size"], d["md5"], d["mtime"],
                  d.get("gen", ""))
