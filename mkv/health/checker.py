"""The health process: probes every volume and publishes its status.

It is the only writer of the `volume_health` table (workers read it, cached for half a
second). A volume goes down after `fail_count` consecutive failures and comes back after
`ok_count` successes (mkv.health.probe). Workers that see a volume fail mid-request send
its name to this process's datagram socket (mkv.health.reporter); that counts as a
failure at once.

It also finishes pending deletes: copies of deleted keys that stayed on a volume that was
down are removed once that volume answers again.

Each probe also reads the volume's identity marker (mkv.identity), pipelined behind the
ping: a volume whose disk is not the one the index knows is marked replaced, so reads
stop going there at once, and its keys are queued for the repair process; once none is
left in the queue its new marker is adopted (docs/design.md, "Self-healing").
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from mkv import core
from mkv import identity as ident
from mkv.cleanup import finish_delete
from mkv.core import PendingAction
from mkv.health.probe import ProbeState, observe
from mkv.health.reporter import health_socket_path
from mkv.index import schema
from mkv.index.reader import Reader
from mkv.keys import sidecar_body, sidecar_path
from mkv.model import HealthRow, Record, State
from mkv.volumes.errors import VolumeError
from mkv.volumes.pool import Pool
from mkv.volumes.wire import Request
from mkv.writer.client import WriterClient
from mkv.writer.protocol import KeyLocked, WriterError

log = logging.getLogger("mkv.health")

CLEANUP_BATCH = 200
#: seconds before a marker a volume refused is written again (one PUT, never a flood)
MARKER_RETRY = 5.0


class MarkerPutOff(VolumeError):
    """The marker's write is put off: the volume refused it a moment ago."""


class HealthChecker:
    def __init__(self, db: str, volumes: Iterable[str], *, interval: float, timeout: float,
                 fail_count: int, ok_count: int, writer_socket: str,
                 orphan_after: float = 400.0) -> None:
        self.volumes = list(volumes)
        self.orphan_after = orphan_after
        self.interval = interval
        self.fail_count = fail_count
        self.ok_count = ok_count
        self.conn = schema.open_index(db)
        self.reader = Reader(self.conn)
        self.pool = Pool(timeout)  # probes, pending deletes and pending operations
        self.executor = ThreadPoolExecutor(max_workers=max(4, len(self.volumes)))
        self.writer = WriterClient(writer_socket, timeout=timeout * 5)
        self.states: dict[str, ProbeState] = {}
        prior = self.reader.health()  # carry "since" across a restart of this process
        for vol in self.volumes:
            if vol in prior:
                row = prior[vol]
                self.states[vol] = ProbeState(row.up, row.since, latency_ms=row.latency_ms,
                                              error=row.error)
        #: volumes whose disk is not the one the index knows, until repaired and adopted
        self.replaced: set[str] = {v for v, row in prior.items() if row.replaced}
        #: the marker each volume's last probe found (None: none there)
        self.markers: dict[str, str | None] = {}
        #: when a volume that refused its marker is asked again (monotonic)
        self.marker_retry: dict[str, float] = {}
        self.stopping = False
        self.sock_path = health_socket_path(db)
        self.sock = self._listen(self.sock_path)

    @staticmethod
    def _listen(path: str) -> socket.socket:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        return sock

    def probe(self, volume: str) -> tuple[bool, float, str | None]:
        """Ping the volume and read its marker in one pipelined round trip."""
        started = time.perf_counter()
        out = self.pool.ask({volume: [Request("GET", "/-/ping"),
                                      Request("GET", ident.MARKER_PATH)]}, ok=(200, 404))[volume]
        took = (time.perf_counter() - started) * 1000
        if isinstance(out, VolumeError):
            return False, took, out.detail
        ping, marker = out
        if ping.status != 200:
            return False, took, f"ping answered {ping.status}"
        if marker.status == 404:
            self.markers[volume] = None
        else:
            try:
                self.markers[volume] = ident.parse_marker(marker.body)
            except ident.BadMarker:
                self.markers[volume] = "unreadable"  # matches no id: a disk mkv did not mark
        return True, took, None

    def record(self, volume: str, ok: bool, latency_ms: float | None, error: str | None) -> None:
        before = self.states.get(volume)
        after = observe(before, ok, time.time(), self.fail_count, self.ok_count, latency_ms, error)
        self.states[volume] = after
        if before is None or before.up != after.up:
            log.info("volume %s is %s%s", volume, "up" if after.up else "down",
                     f" ({error})" if error else "")
            if after.up:  # a volume back (its nginx restarted) may take its marker now
                self.marker_retry.pop(volume, None)

    def publish(self) -> None:
        now = time.time()
        schema.write_health(self.conn, [
            HealthRow(v, s.up, now, s.since, s.latency_ms, s.error, v in self.replaced)
            for v, s in self.states.items()
        ])

    def round(self) -> None:
        self.markers.clear()
        results = list(self.executor.map(self.probe, self.volumes))
        for vol, (ok, latency, error) in zip(self.volumes, results, strict=True):
            self.record(vol, ok, latency, error)
        try:
            newly = self.identify()
        except WriterError as exc:  # the next round tries again
            log.warning("volume identity: the writer did not answer: %s", exc)
            newly = []
        self.publish()  # reads stop going to a replaced volume from here on
        for vol in newly:
            try:
                queued = self.writer.repair_volume(vol, "replaced")
                log.warning("volume %s: %d keys queued for repair", vol, queued)
            except WriterError as exc:
                log.warning("volume %s: keys not queued yet: %s", vol, exc)
                self.replaced.discard(vol)  # found replaced again next round, queued then

    def _write_marker(self, volume: str) -> str:
        """Give a volume without a marker a new id (mkv is one of its writers). After a
        failed try, the next waits a while: a volume that refuses writes is not asked
        (and logged) every round."""
        if time.monotonic() < self.marker_retry.get(volume, 0.0):
            raise MarkerPutOff(volume, "marker write failed a moment ago")
        vid = ident.new_id()
        error = self.pool.exchange({volume: [Request("PUT", ident.MARKER_PATH,
                                                     ident.marker_body(vid))]}).get(volume)
        if error is not None:
            self.marker_retry[volume] = time.monotonic() + MARKER_RETRY
            raise error
        return vid

    def identify(self) -> list[str]:
        """Compare the markers found this round with the ids the index expects
        (ident.identity); the volumes newly found replaced. docs/design.md, "Self-healing"."""
        expected = self.reader.volume_ids()
        newly = []
        for vol, found in self.markers.items():
            want, seen = expected.get(vol, (None, ""))
            verdict = ident.identity(want, found)
            try:
                if verdict is ident.Identity.CREATE:
                    self.writer.volume_id(vol, self._write_marker(vol))
                elif verdict is ident.Identity.ADOPT:
                    assert found is not None
                    self.writer.volume_id(vol, found)
                elif verdict is ident.Identity.SAME:
                    self.replaced.discard(vol)
                elif vol in self.replaced and found is None:
                    # a replaced disk that could not take its marker yet: give it one now
                    assert want is not None
                    self.writer.volume_id(vol, want, self._write_marker(vol))
                elif vol not in self.replaced or found != seen:
                    assert want is not None
                    had = "no marker" if found is None else f"marker {found}"
                    if found is None:
                        # replaced whether or not the disk takes a marker now (a new disk
                        # under a running nginx has no upload spool until it restarts)
                        try:
                            found = self._write_marker(vol)
                        except (MarkerPutOff, VolumeError) as exc:
                            log.warning("volume %s: cannot write its marker yet: %s", vol,
                                        getattr(exc, "detail", exc))
                    log.warning("volume %s is replaced: its disk had %s, the index expects %s",
                                vol, had, want)
                    self.writer.volume_id(vol, want, found or "")
                    self.replaced.add(vol)
                    newly.append(vol)
                elif self.reader.repair_left(vol) == 0:
                    self.writer.volume_id(vol, found)
                    self.replaced.discard(vol)
                    log.info("volume %s is repaired: its disk's id %s is adopted", vol, found)
            except MarkerPutOff:
                pass
            except VolumeError as exc:
                log.warning("volume %s: cannot write its marker: %s", vol, exc.detail)
        return newly

    def take_reports(self, wait: float) -> None:
        """Wait up to `wait` seconds for failure reports; each counts as a failed probe."""
        self.sock.settimeout(max(wait, 0.0))
        reported = False
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                break
            vol = data.decode(errors="replace")
            if vol in self.volumes:
                self.record(vol, False, None, "failed during a request")
                reported = True
            self.sock.settimeout(0)
        if reported:
            self.publish()

    def cleanup(self) -> int:
        """Finish deletes whose copies stayed on volumes that were down. Returns keys done."""
        done = 0
        up = {v for v, s in self.states.items() if s.up}
        for rec in self._pending_deletes(up):
            try:
                current = self.writer.lock(rec.key)
            except KeyLocked:
                continue  # someone is writing it: it is theirs now
            except WriterError:
                return done
            if current is None or current.state is not State.DELETING:
                self.writer.release(rec.key)
                continue
            try:
                left, errors = finish_delete(self.pool, self.writer, current,
                                             [v for v in current.volumes if v in up])
            except WriterError:
                self.writer.close()  # drops the lock too
                return done
            self._failed_during_work(up, errors)
            done += not left
        return done

    def _failed_during_work(self, up: set[str], errors: Iterable[VolumeError]) -> None:
        """A volume that fails the clean-up counts as a failed probe, and is left alone for
        the rest of the round: one slow volume must not hold up the probes of all."""
        for err in core.blamed(list(errors)):
            if err.volume in up:
                up.discard(err.volume)
                self.record(err.volume, False, None, f"failed during clean-up: {err.detail}")
                self.publish()

    def _pending_deletes(self, up: set[str]) -> Iterator[Record]:
        """DELETING records with a copy on a volume that answers, a page at a time, so
        deletes stuck on a down volume never hold back the others; at most a batch."""
        after, given = "", 0
        while given < CLEANUP_BATCH:
            page = self.reader.records_in_state(State.DELETING, after, CLEANUP_BATCH)
            if not page:
                return
            after = page[-1].key
            for rec in page:
                if set(rec.volumes) & up:
                    given += 1
                    yield rec
                    if given >= CLEANUP_BATCH:
                        return

    def finish_pending(self) -> int:
        """Carry out due pending operations on volumes that answer (docs/design.md,
        "Pending operations"): remove copies no record names, mark sidecars of keys
        unlinked while their volume was down. Each under the key's lock, decided by
        core.pending_action on the record as it is then. Returns operations finished."""
        done = 0
        up = {v for v, s in self.states.items() if s.up}
        for item in self.reader.due_pending(time.time() - self.orphan_after, up, CLEANUP_BATCH):
            if item.volume not in up:
                continue  # failed earlier in this round
            try:
                current = self.writer.lock(item.key)
            except KeyLocked:
                continue  # a write is in flight: its end decides
            except WriterError:
                return done
            try:
                action = core.pending_action(item, current)
                error = None
                if action is not PendingAction.DROP:
                    self.writer.held(item.key)
                if action is PendingAction.REMOVE:
                    error = self.pool.remove_copies(item.key, [item.volume], item.gen).get(item.volume)
                elif action is PendingAction.MARK:
                    assert current is not None
                    body = sidecar_body(item.key, current.size, current.md5, unlinked=True)
                    error = self.pool.exchange(
                        {item.volume: [Request("PUT", sidecar_path(item.key, item.gen), body)]}
                    ).get(item.volume)
                if error is not None:
                    log.warning("pending %s of %r on %s: %s", item.op.name, item.key, item.volume, error)
                    self._failed_during_work(up, [error])
                    self.writer.release(item.key)
                    continue
                self.writer.pending_done(item)
                done += 1
            except WriterError:
                self.writer.close()  # drops the lock too
                return done
        return done

    def run(self) -> None:
        while not self.stopping:
            started = time.monotonic()
            self.round()
            try:
                cleaned = self.cleanup()
                if cleaned:
                    log.info("finished %d pending deletes", cleaned)
                finished = self.finish_pending()
                if finished:
                    log.info("finished %d pending operations on copies", finished)
            except Exception:  # noqa: BLE001 - cleanup must never stop the probes
                log.exception("pending-delete cleanup failed")
            while not self.stopping:
                left = self.interval - (time.monotonic() - started)
                if left <= 0:
                    break
                self.take_reports(min(left, 0.25))
        self.sock.close()
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
