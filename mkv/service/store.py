"""The service's operations on keys: core decisions carried out against the
index, the writer and the volumes. One Store per worker process, built after fork.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import itertools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mkv import context, core
from mkv.cleanup import finish_delete
from mkv.config import Config
from mkv.core import Health, Verdict
from mkv.health.reporter import FailureReporter
from mkv.index.reader import Reader
from mkv.keys import blob_path, new_gen, sidecar_body, sidecar_path
from mkv.model import Record, State
from mkv.service import metrics
from mkv.volumes.errors import UploadAborted, VolumeError
from mkv.volumes.pool import FanOut, Pool
from mkv.volumes.wire import Request
from mkv.writer.client import ThreadClients, WriterClient
from mkv.writer.protocol import KeyLocked, WriterError

log = logging.getLogger("mkv.service.store")

CHUNK = 1 << 20
HEALTH_CACHE_SECONDS = 0.5


class StoreError(Exception):
    """Base of every answer a key operation gives instead of success."""


class KeyExists(StoreError):
    pass


class KeyMissing(StoreError):
    pass


class Protected(StoreError):
    pass


class InFlight(StoreError):
    pass


class BadDigest(StoreError):
    pass


class ClientGone(StoreError):
    """The request body ended early: the client went away mid-upload."""


class EmptyValue(StoreError):
    """A chunked body with no byte in it: there is no empty value (411, as for
    Content-Length: 0)."""


class TooLarge(StoreError):
    """A body of unknown length (chunked) went over `max-value-bytes` (413)."""


class Unavailable(StoreError):
    """Not enough healthy volumes, or the writer is not answering."""


class VolumeFailed(StoreError):
    """A volume failed during the operation; nothing was recorded."""


def parse_content_md5(header: str | None) -> str | None:
    """Content-MD5 as hex; accepts RFC 1864 base64 and plain hex."""
    if not header:
        return None
    text = header.strip()
    if len(text) == 32:
        try:
            bytes.fromhex(text)
            return text.lower()
        except ValueError:
            pass
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadDigest("Content-MD5 is neither base64 nor hex") from None
    if len(raw) != 16:
        raise BadDigest("Content-MD5 is not 16 bytes")
    return raw.hex()


class Store:
    def __init__(self, cfg: Config, reader: Reader, pool: Pool,
                 writer_factory: Callable[[], WriterClient],
                 reporter: FailureReporter | None = None) -> None:
        self.cfg = cfg
        self.reader = reader
        self.pool = pool
        self.ring = cfg.ring()
        self.public = dict(cfg.public_urls)  # volume -> the base URL clients are sent to
        self.executor = ThreadPoolExecutor(max_workers=cfg.threads * cfg.replicas * 2,
                                           thread_name_prefix="mkv-io")
        self.writers = ThreadClients(writer_factory)
        self._health: dict[str, Health] = {}
        self._health_at = -1.0
        self._spread = itertools.count()
        self.reporter = reporter
        self._suspects: dict[str, float] = {}

    # --- facts ---

    @property
    def writer(self) -> WriterClient:
        return self.writers.get()

    def health(self) -> dict[str, Health]:
        """Published volume health (cached briefly), with this worker's own fresh
        failures treated as down until the health process has had time to probe."""
        now = time.monotonic()
        if now - self._health_at > HEALTH_CACHE_SECONDS:
            stale = core.stale_after(self.cfg.health_interval, self.cfg.health_timeout)
            self._health = core.health_status(self.reader.health(), time.time(), stale)
            self._health_at = now
        if not self._suspects:
            return self._health
        health = dict(self._health)
        for vol, until in list(self._suspects.items()):
            if until < now:
                self._suspects.pop(vol, None)
            else:
                health[vol] = Health.DOWN
        return health

    def _gone(self, volume: str) -> bool:
        """Marked down since the request began (by the health process, or by this
        worker's own failures): waiting on it any longer only delays the answer."""
        return self.health().get(volume) is Health.DOWN

    def _blame(self, errors: list[BaseException | None]) -> None:
        """Count volume failures at once: locally, and with the health process."""
        for err in core.blamed(errors):
            self._suspects[err.volume] = time.monotonic() + self.cfg.health_interval * (
                self.cfg.health_fail_count + 1)
            metrics.volume_error(err.volume, type(err).__name__)
            if self.reporter is not None:
                self.reporter.report(err.volume)

    # --- reads ---

    def locate(self, key: str) -> tuple[core.ReadTarget, Record | None]:
        record = self.reader.get(key)
        # signed or not (docs/design.md, "Signed redirects"), naming the other replicas
        # ("Read failover")
        target = core.read_target(key, record, self.health(), self.cfg.fallback,
                                  next(self._spread), self.public,
                                  secret=self.cfg.redirect_secret, now=time.time(),
                                  ttl=self.cfg.redirect_ttl)
        if isinstance(target, core.Redirect) and target.volume is not None:
            context.touch(target.volume)  # the volume the client is sent to, for the access log
        return target, record

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one Store per worker, kept for its life
    def balanced(self, record: Record) -> bool:
        """Key-Balance, on every GET: the ring walk is cached per record."""
        return core.balanced(record, self.ring, self.cfg.replicas)

    # --- writes ---

    def _lock(self, key: str, intend: list[str] | None = None, gen: str = "") -> Record | None:
        try:
            return self.writer.lock(key, retry=True, intend=intend or (), gen=gen)
        except KeyLocked:
            raise InFlight(key) from None

    def _place(self, key: str) -> list[str]:
        try:
            return core.place(key, self.ring, self.health(), self.cfg.replicas)
        except core.NotEnoughVolumes as exc:
            raise Unavailable(str(exc)) from None

    def put(self, key: str, length: int | None, read: Callable[[int], bytes],
            content_md5: str | None) -> Record:
        """Stream `length` bytes from `read` to R volumes, then record them. `length`
        None is a chunked body, read to its end: its size is counted on the way and
        held to `max-value-bytes` (docs/design.md, "Write protocol")."""
        expect_md5 = parse_content_md5(content_md5)
        first = b""
        if length is None:
            # the first chunk and one byte more, before the lock: an empty body, a body
            # over a small limit and a body that fits in one chunk are told apart without
            # holding anything but that chunk
            first = self._read_upto(CHUNK + 1, read)
            if not first:
                raise EmptyValue("empty value")
            if len(first) > self.cfg.max_value_bytes:
                raise TooLarge(f"more than the limit of {self.cfg.max_value_bytes} bytes")
            if len(first) <= CHUNK:  # the whole body: the small path, which can re-place
                length = len(first)
        # placed before the lock, so the lock's commit records the write's intent too:
        # every copy this PUT attempts is accounted for (docs/design.md, "Write protocol")
        try:
            volumes: list[str] | None = self._place(key)
        except Unavailable as exc:
            volumes, unavailable = None, exc
        # a name of its own for every write: two writes of a key never share a file
        gen = new_gen(time.time_ns(), os.urandom(3))
        current = self._lock(key, intend=volumes, gen=gen)
        verdict = core.put_verdict(current)
        # the writer recorded intents unless the PUT is refused (403) or cannot be placed
        intent_gen = gen if volumes is not None and verdict is Verdict.PROCEED else ""
        try:
            if verdict is Verdict.EXISTS:
                raise KeyExists(key)
            if volumes is None:
                raise unavailable
            if length is not None and length <= CHUNK:
                body = first or self._read_all(length, read)
                volumes, md5 = self._upload_small(key, gen, volumes, body, expect_md5)
                size = length
            else:
                size, md5 = self._upload(key, gen, volumes, length, read, expect_md5, first)
            record = Record(key, State.LIVE, tuple(volumes), size, md5, time.time(), gen)
            try:
                # the writer queues the copies the record does not name for removal,
                # and those of a delete this PUT replaces
                self.writer.put(record, retry=True, new=True, intent=True)
            except WriterError as exc:
                if not exc.refused:
                    raise  # maybe committed (an answer lost): its copies are not touched
                # refused for certain: another write got in while a writer restart had
                # dropped this one's lock (or its intents were cleaned up meanwhile). Its
                # own files go now, whatever became of its intents.
                self._remove(key, gen, volumes)
                raise InFlight(key) from None
            # the copies of the unlinked or deleted value this one replaces: removed now,
            # as a courtesy (other file names: no other write can use them); the writer
            # has queued them, so the health process makes sure of it
            replaced = core.replaced_copies(current, record)
            if replaced:
                self._remove(key, current.gen, replaced)
            return record
        except BaseException:
            self.writer.release(key, intent_gen)
            raise

    @staticmethod
    def _read_upto(n: int, read: Callable[[int], bytes]) -> bytes:
        """At most `n` bytes of a body that ends cleanly (a chunked body's last chunk):
        fewer only at its end."""
        parts, got = [], 0
        while got < n:
            try:
                chunk = read(n - got)
            except (OSError, ValueError) as exc:
                raise ClientGone(str(exc)) from exc
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _read_all(self, length: int, read: Callable[[int], bytes]) -> bytes:
        """Exactly `length` bytes of a body, or ClientGone if it ends before."""
        body = self._read_upto(length, read)
        if len(body) < length:
            raise ClientGone(f"body ended after {len(body)} of {length} bytes")
        return body

    def _upload_small(self, key: str, gen: str, volumes: list[str], body: bytes,
                      expect_md5: str | None) -> tuple[list[str], str]:
        """A body that fits in one chunk is held, so a replica that fails can be
        replaced by the next healthy volume clockwise instead of failing the PUT."""
        md5 = hashlib.md5(body, usedforsecurity=False).hexdigest() if (self.cfg.md5 or expect_md5) else ""
        if expect_md5 is not None and expect_md5 != md5:
            raise BadDigest(f"Content-MD5 {expect_md5} does not match the body's {md5}")
        sidecar = sidecar_body(key, len(body), md5)

        both = [Request("PUT", blob_path(key, gen), body),
                Request("PUT", sidecar_path(key, gen), sidecar)]
        done: list[str] = []
        failed: list[VolumeError] = []
        intended = set(volumes)  # recorded with the lock
        for _attempt in range(3):
            todo = [v for v in volumes if v not in done]
            # a volume marked down meanwhile, or far slower than the others, is given up
            # on early and the replica placed again: its copy is the intent's to clean
            errors: list[VolumeError] = list(self.pool.exchange(
                {v: both for v in todo}, gone=self._gone, hedge=True).values())
            self._blame(errors)
            failed += errors
            bad = {e.volume for e in errors}
            done += [v for v in todo if v not in bad]
            if not errors:
                stray = [v for v in done if v not in volumes]  # placement moved meanwhile
                if stray:
                    self._remove(key, gen, stray)
                return volumes, md5
            try:
                volumes = self._place(key)  # the failed ones now count as down
            except Unavailable:
                break
            new = [v for v in volumes if v not in intended]
            if new:
                # before any byte goes there
                self._expecting(key, self.writer.intend, key, gen, new, retry=True)
                intended.update(new)
        self._remove(key, gen, sorted(set(done) | {e.volume for e in failed}))
        raise VolumeFailed("; ".join(str(e) for e in failed))

    def _upload(self, key: str, gen: str, volumes: list[str], length: int | None,
                read: Callable[[int], bytes], expect_md5: str | None, first: bytes = b""
                ) -> tuple[int, str]:
        """Stream the body to every volume at once; (size, md5). `length` None: a chunked
        body (`first` is its beginning, already read), streamed chunked to the volumes
        and cut off (TooLarge) the moment it passes `max-value-bytes`."""
        digest = hashlib.md5(usedforsecurity=False) if (self.cfg.md5 or expect_md5) else None
        path = blob_path(key, gen)
        fan = FanOut(self.pool, self.executor, volumes, path, length, gone=self._gone)
        limit = self.cfg.max_value_bytes
        got = 0
        cut = False  # a replica failed: the others' bodies are cut off too, never ended
        try:
            while length is None or got < length:
                if first:
                    chunk, first = first, b""
                else:
                    try:
                        chunk = read(CHUNK if length is None else min(CHUNK, length - got))
                    except (OSError, ValueError) as exc:
                        raise ClientGone(str(exc)) from exc
                if not chunk:
                    if length is None:
                        break  # the last chunk: the body is complete
                    raise ClientGone(f"body ended after {got} of {length} bytes")
                got += len(chunk)
                if length is None and got > limit:
                    # before the chunk goes anywhere; the aborted bodies are dropped
                    raise TooLarge(f"more than the limit of {limit} bytes")
                if digest is not None:
                    digest.update(chunk)
                fan.send(chunk)
                if fan.failed.is_set():
                    cut = True
                    break
        except BaseException:
            fan.abort()
            self._remove(key, gen, volumes)
            raise
        md5 = digest.hexdigest() if digest is not None else ""
        # ending a chunked body early would make the bytes so far a blob: it is cut off
        results = fan.abort() if cut else fan.finish()
        self._blame(results)
        if core.put_outcome(results) is not core.PutOutcome.STORED or (
                length is not None and got != length):
            self._remove(key, gen, volumes)
            errors = [r for r in results if r is not None and not isinstance(r, UploadAborted)]
            raise VolumeFailed("; ".join(str(e) for e in errors) or "upload failed")
        if expect_md5 is not None and expect_md5 != md5:
            self._remove(key, gen, volumes)
            raise BadDigest(f"Content-MD5 {expect_md5} does not match the body's {md5}")
        errors = self._small({v: [Request("PUT", sidecar_path(key, gen), sidecar_body(key, got, md5))]
                              for v in volumes})
        if errors:
            self._remove(key, gen, volumes)
            raise VolumeFailed("; ".join(str(e) for e in errors))
        return got, md5

    def _small(self, work: dict[str, list[Request]], ok: tuple[int, ...] = (200, 201, 204)
               ) -> list[VolumeError]:
        """Small requests (sidecars, deletes) pipelined on every volume at once, with no
        thread per volume; the volume errors, already blamed."""
        errors = list(self.pool.exchange(work, ok).values())
        self._blame(errors)
        return errors

    def _remove(self, key: str, gen: str, volumes: list[str] | tuple[str, ...]) -> list[VolumeError]:
        """Remove write `gen`'s copies of the key on these volumes (Pool.remove_copies):
        at once, as a courtesy; the write's intents make sure of it (pending operations)."""
        errors = list(self.pool.remove_copies(key, volumes, gen, gone=self._gone).values())
        self._blame(errors)
        for err in errors:
            log.warning("could not remove %r from %s: %s", key, err.volume, err.detail)
        return errors

    def delete(self, key: str) -> None:
        """Hard delete: hide the key at once, then remove its copies.

        The record is first marked DELETING (durably), so a crash or a down
        volume leaves a pending cleanup, never a key that points at nothing.
        """
        current = self._lock(key)
        try:
            verdict = core.delete_verdict(current, self.cfg.protect)
            if verdict is Verdict.MISSING:
                raise KeyMissing(key)
            if verdict is Verdict.PROTECTED:
                raise Protected(key)
            # each step names the record it expects: a writer restart drops the lock, and a
            # retry must not overwrite a PUT that another client made in that gap
            deleting = self._expecting(key, self.writer.set_state, key, State.DELETING,
                                       keep_lock=True, retry=True, expect=current)
            # copies on down volumes stay pending: the health process finishes them
            remove_now, _ = core.reachable_split(deleting, self.health())
            _, errors = self._expecting(key, finish_delete, self.pool, self.writer, deleting,
                                        remove_now)
            self._blame(errors)
        except BaseException:
            self.writer.release(key)
            raise

    @staticmethod
    def _expecting(key: str, op: Callable[..., Any], *args: object, **kw: object) -> Any:
        """A compare-and-set writer call; a conflict (or a lost lock) means another client's
        write got in while a writer restart had dropped this request's lock: 409, nothing
        overwritten."""
        try:
            return op(*args, **kw)
        except WriterError as exc:
            if exc.refused:
                raise InFlight(key) from None
            raise

    def unlink(self, key: str) -> None:
        """Soft delete: invisible to reads and ?list, blobs kept, listed by ?unlinked."""
        current = self._lock(key)
        try:
            if core.unlink_verdict(current) is Verdict.MISSING:
                raise KeyMissing(key)
            # sidecars first: a crash in between hides a live key from a rebuild (it is
            # listed by ?unlinked), never brings an unlinked one back
            # a sidecar on a down volume (or one that fails now) is marked by the health
            # process once its volume answers: a pending operation, in the same commit
            body = sidecar_body(key, current.size, current.md5, unlinked=True)
            now, later = core.reachable_split(current, self.health())
            path = sidecar_path(key, current.gen)
            errors = self._small({v: [Request("PUT", path, body)] for v in now})
            failed = {e.volume for e in errors}
            self._expecting(key, self.writer.set_state, key, State.UNLINKED, retry=True,
                            expect=current, mark=[v for v in current.volumes
                                                  if v in later or v in failed])
        except BaseException:
            self.writer.release(key)
            raise
