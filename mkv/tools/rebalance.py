"""mkv-rebalance: move blobs so every key lives where the ring says, with R good copies.

Walks the index in key order. For each key it takes the key's lock from the
writer (the running service's, or one it starts itself when the service is
stopped), checks the recorded copies, and carries out the pure plan from
`core.rebalance_plan`: copy to the volumes that lack a good copy (streamed
volume to volume), point the index at every copy that exists, delete the
unwanted copies, then point the index at exactly the ring's volumes. The index
never names a copy that does not exist, and a copy is never deleted before the
index stops needing it, so a kill at any moment leaves a state the next run
finishes. Pending deletes are finished on the way.

Ctrl-C (SIGINT) or SIGTERM stops it in order: no new key is started, copies under
way are cut short and removed, the keys in hand are settled, and the summary of what
was done is printed (exit 128 + the signal: 130 for Ctrl-C). A second one ends the
process at once, which is as safe as any kill.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import configargparse

from mkv import config as config_mod
from mkv import core
from mkv.cleanup import finish_delete
from mkv.config import Config
from mkv.index import schema
from mkv.index.reader import Reader
from mkv.keys import blob_path, sidecar_body, sidecar_path
from mkv.model import Record, State
from mkv.tools.progress import Progress
from mkv.tools.throttle import RateLimiter
from mkv.volumes.errors import UploadAborted, VolumeError
from mkv.volumes.pool import Download, FanOut, Pool
from mkv.volumes.wire import Request
from mkv.writer.client import ThreadClients, WriterClient
from mkv.writer.lockfile import writer_running
from mkv.writer.protocol import KeyLocked, LockLost, WriterError
from mkv.writer.server import serve_in_thread

CHUNK = 1 << 20
PAGE = 500
BUSY_RETRIES = 5


class SourceFailed(UploadAborted):
    """The copy's source broke or ended short mid-stream; another source may do."""


class KeyProblem(Exception):
    """This key could not be put in place; the message says why (reported, exit 1)."""


class Interrupted(Exception):
    """The run is being stopped (Ctrl-C): this key's copy is cut short and left as it was."""


@dataclasses.dataclass
class Stats:
    total: int = 0
    examined: int = 0
    moved: int = 0
    copies: int = 0
    sidecars: int = 0
    deletions: int = 0
    bytes: int = 0
    cleaned: int = 0
    interrupted: int = 0
    problems: dict[str, str] = dataclasses.field(default_factory=dict)


def add_arguments(p: configargparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, change nothing (only on the command line)")
    p.add_argument("--concurrency", type=int, default=4, help="keys moved at once")
    p.add_argument("--limit-rate", type=float, default=0,
                   help="bytes per second copied, across all keys (0: unlimited)")
    p.add_argument("--verify", action="store_true",
                   help="check each source copy's md5, not only its size")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines (the summary is still printed)")


class Rebalancer:
    def __init__(self, cfg: Config, *, concurrency: int, limit_rate: float, verify: bool,
                 out=sys.stderr, quiet: bool = False) -> None:
        self.cfg = cfg
        self.ring = cfg.ring()
        self.reader = Reader(schema.connect(cfg.db, synchronous=cfg.synchronous))
        self.pool = Pool(cfg.volume_timeout)
        self.concurrency = concurrency
        self.executor = ThreadPoolExecutor(max_workers=concurrency * (cfg.replicas + 2),
                                           thread_name_prefix="rebalance-io")
        self.verify = verify
        self.limiter = RateLimiter(limit_rate)
        self._rate_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.writers = ThreadClients(
            lambda: WriterClient(cfg.writer_socket, timeout=cfg.volume_timeout * 3))
        self.stats = Stats()
        self.out = out
        self.quiet = quiet
        #: set by `interrupt`: start no key, cut copies short
        self.stopping = threading.Event()

    # --- plumbing ---

    @property
    def writer(self) -> WriterClient:
        return self.writers.get()

    def count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, n in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    def interrupt(self) -> None:
        """Stop in order (from a signal handler: only sets a flag)."""
        self.stopping.set()

    def _throttle(self, n: int) -> None:
        with self._rate_lock:
            wait = self.limiter.delay(n, time.monotonic())
        if wait > 0:
            self.stopping.wait(wait)
        if self.stopping.is_set():
            raise Interrupted

    # --- checks ---

    def _check(self, rec: Record) -> tuple[set[str], set[str]]:
        """Which recorded copies are good (right size, right md5 with --verify), and
        which of those have their sidecar. One pipelined round trip (HEAD blob, HEAD
        sidecar) per volume, all volumes at once: this runs for every key."""
        heads = [Request("HEAD", blob_path(rec.key, rec.gen)),
                 Request("HEAD", sidecar_path(rec.key, rec.gen))]
        answers = self.pool.ask({vol: heads for vol in rec.volumes}, ok=(200, 404))
        good: set[str] = set()
        sidecar: set[str] = set()
        for vol, out in answers.items():
            if isinstance(out, VolumeError):
                continue
            blob, side = out
            if blob.status == 200 and blob.length == rec.size:
                good.add(vol)
                if side.status == 200:
                    sidecar.add(vol)
        if self.verify and rec.md5 and good:
            md5s = dict(zip(good, self.executor.map(lambda v: self._md5_of(v, rec), good),
                            strict=True))
            good = {v for v, md5 in md5s.items() if md5 == rec.md5}
            sidecar &= good
        return good, sidecar

    def _md5_of(self, vol: str, rec: Record) -> str | None:
        """The copy's md5, or None when it cannot be read."""
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with self.pool.download(vol, blob_path(rec.key, rec.gen)) as blob:
                for chunk in blob.chunks(CHUNK):
                    digest.update(chunk)
        except VolumeError:
            return None
        return digest.hexdigest()

    # --- moves ---

    def _chunks(self, blob: Download, rec: Record, digest) -> Iterator[bytes]:  # noqa: ANN001
        """The source's bytes, throttled and hashed; a source that breaks or ends short
        raises SourceFailed, so the copy moves on to the next source."""
        got = 0
        try:
            for chunk in blob.chunks(CHUNK):
                self._throttle(len(chunk))
                if digest is not None:
                    digest.update(chunk)
                got += len(chunk)
                yield chunk
        except (SourceFailed, Interrupted):
            raise
        except Exception as exc:  # noqa: BLE001 - whatever broke the read, it is the source's
            raise SourceFailed(f"read failed: {exc}") from exc
        if got != rec.size:
            raise SourceFailed(f"read {got} of {rec.size} bytes")

    def _copy_from(self, src: str, rec: Record, targets: tuple[str, ...], digest) -> bool:  # noqa: ANN001
        """One attempt; True when the sidecars were written too. One target (adding a
        volume) streams straight through, its sidecar pipelined behind the blob (unless
        the bytes are still to be checked); several go through FanOut so the slowest
        bounds memory."""
        path = blob_path(rec.key, rec.gen)
        with self.pool.download(src, path) as blob:  # a body left unread drops the connection
            if len(targets) == 1:
                then = [] if digest is not None else [Request("PUT", sidecar_path(rec.key, rec.gen),
                                                              self._sidecar(rec))]
                try:
                    self.pool.put_stream(targets[0], path, self._chunks(blob, rec, digest),
                                         rec.size, then)
                except VolumeError as exc:
                    raise KeyProblem(f"copy failed: {exc}") from exc
                return bool(then)
            fan = FanOut(self.pool, self.executor, list(targets), path, rec.size)
            try:
                for chunk in self._chunks(blob, rec, digest):
                    fan.send(chunk)
                    if fan.failed.is_set():
                        break
            except (SourceFailed, Interrupted):
                fan.abort()
                raise
            failed = [r for r in fan.finish() if r is not None]
            if failed:
                raise KeyProblem("copy failed: " + "; ".join(str(r) for r in failed))
            return False

    def _copy(self, rec: Record, sources: tuple[str, ...], targets: tuple[str, ...]) -> None:
        """Stream the blob from the first source that works to every target, and write
        the targets' sidecars. When no source works, what the attempts left on volumes
        the record does not name is removed: no orphan stays behind."""
        errors = []
        for src in sources:
            # with --verify the bytes copied are checked too, not only the sources' sizes
            digest = hashlib.md5(usedforsecurity=False) if self.verify and rec.md5 else None
            try:
                with_sidecars = self._copy_from(src, rec, targets, digest)
            except (SourceFailed, VolumeError) as exc:
                errors.append(f"{src}: {exc}")
                continue
            except (KeyProblem, Interrupted):
                self._discard(rec, targets)
                raise
            if digest is not None and digest.hexdigest() != rec.md5:
                errors.append(f"{src}: md5 {digest.hexdigest()} != {rec.md5}")
                continue  # the next source overwrites the bad copies
            self.count(copies=len(targets), bytes=rec.size * len(targets))
            if with_sidecars:
                self.count(sidecars=len(targets))
                return
            try:
                self._sidecars(rec, targets)
            except KeyProblem:
                self._discard(rec, targets)
                raise
            return
        self._discard(rec, targets)
        raise KeyProblem("no source could be copied: " + "; ".join(errors))

    def _discard(self, rec: Record, targets: tuple[str, ...]) -> None:
        """Remove what a failed copy left on volumes the record does not name."""
        with contextlib.suppress(LockLost):
            self._drop(rec, tuple(v for v in targets if v not in rec.volumes), count=False)

    @staticmethod
    def _sidecar(rec: Record) -> bytes:
        return sidecar_body(rec.key, rec.size, rec.md5, unlinked=rec.state is State.UNLINKED)

    def _sidecars(self, rec: Record, targets: tuple[str, ...]) -> None:
        put = [Request("PUT", sidecar_path(rec.key, rec.gen), self._sidecar(rec))]
        errors = self.pool.exchange({vol: put for vol in targets})
        if errors:
            raise KeyProblem("sidecar write failed: " + "; ".join(map(str, errors.values())))
        self.count(sidecars=len(targets))

    def _drop(self, rec: Record, volumes: tuple[str, ...], count: bool = True) -> list[str]:
        """Delete copies (Pool.remove_copies); the volumes where it failed. Only while
        the key's lock is still held (WriterClient.held raises LockLost, nothing removed).
        Not counted (`count=False`) when what is removed is a failed copy's leftovers."""
        if not volumes:
            return []
        self.writer.held(rec.key)
        errors = self.pool.remove_copies(rec.key, volumes, rec.gen)
        if count:
            self.count(deletions=len(volumes) - len(errors))
        return [vol for vol in volumes if vol in errors]

    def _finish_delete(self, rec: Record) -> None:
        left, errors = finish_delete(self.pool, self.writer, rec, rec.volumes)
        self.count(deletions=len(rec.volumes) - len(left))
        if left:
            raise KeyProblem(f"pending delete: could not remove copies on {', '.join(left)}")
        self.count(cleaned=1)

    def desired(self, rec: Record) -> tuple[str, ...]:
        """Where the key's copies should be: the ring's volumes. Repair and scrub keep
        the record's own (mkv.repair), so they mend copies and never move them."""
        return tuple(self.ring.place(rec.key, self.cfg.replicas))

    def _move(self, rec: Record) -> None:
        """One key, under its lock (taken by the caller)."""
        desired = self.desired(rec)
        good, sidecar_ok = self._check(rec)
        move = core.rebalance_plan(rec, desired, good, sidecar_ok)
        if move.lost:
            raise KeyProblem("no good copy on any recorded volume")
        if move.in_place(rec):
            self.writer.release(rec.key)
            return
        if move.copy_to:
            self._copy(rec, move.sources, move.copy_to)
        if move.sidecar_to:
            self._sidecars(rec, move.sidecar_to)
        # the index names every copy that exists, then loses the unwanted ones
        interim = desired + move.drop
        if interim != rec.volumes:
            self.writer.put(dataclasses.replace(rec, volumes=interim), expect=rec, keep_lock=True,
                            retry=True)
        if move.drop:
            failed = self._drop(rec, move.drop)
            if failed:
                self.writer.release(rec.key)
                raise KeyProblem(f"could not delete the old copies on {', '.join(failed)}")
            self.writer.put(dataclasses.replace(rec, volumes=desired),
                            expect=dataclasses.replace(rec, volumes=interim), retry=True)
        else:
            self.writer.release(rec.key)
        self.count(moved=1)

    def process(self, key: str) -> bool | None:
        """Put one key in place. False when its lock is busy (try again later), None when
        the run is stopping and the key was not started."""
        if self.stopping.is_set():
            return None
        try:
            current = self.writer.lock(key, retry=True)
        except KeyLocked:
            return False
        except WriterError as exc:
            with self._stats_lock:
                self.stats.problems[key] = f"writer: {exc}"
            return True
        try:
            if current is None:
                self.writer.release(key)
            elif current.state is State.DELETING:
                self._finish_delete(current)
            else:
                self._move(current)
        except (KeyProblem, WriterError, VolumeError) as exc:
            with self._stats_lock:
                self.stats.problems[key] = str(exc)
            self.writer.release(key)
        except Interrupted:
            self.count(interrupted=1)
            self.writer.release(key)
        return True

    # --- the walk ---

    def run(self) -> Stats:
        self.stats.total = self.reader.count()
        busy: list[str] = []
        stop = threading.Event()
        show = Progress(self.out, enabled=not self.quiet)
        progress = threading.Thread(target=self._progress, args=(stop, show), daemon=True)
        progress.start()
        started = time.monotonic()
        try:
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="rebalance") as keys_pool:
                after = ""
                while not self.stopping.is_set():
                    page = self.reader.scan(after, PAGE)
                    if not page:
                        break
                    after = page[-1].key
                    for key, done in zip((r.key for r in page),
                                         keys_pool.map(self.process, [r.key for r in page]),
                                         strict=True):
                        if done is None:
                            continue  # not started: the run is stopping
                        self.count(examined=1)
                        if not done:
                            busy.append(key)
            for attempt in range(BUSY_RETRIES):
                if not busy or self.stopping.is_set():
                    break
                self.stopping.wait(0.2 * (attempt + 1))
                busy = [k for k in busy if self.process(k) is False]
            if not self.stopping.is_set():
                for key in busy:
                    self.stats.problems[key] = "in use by a client write the whole time (locked)"
        finally:
            stop.set()
            progress.join()
        show.end()
        state = "interrupted" if self.stopping.is_set() else "done"
        print(self._line(time.monotonic() - started, state), file=self.out, flush=True)
        return self.stats

    def _line(self, elapsed: float, state: str = "progress") -> str:
        s = self.stats
        rate = s.examined / elapsed if elapsed > 0 else 0.0
        eta = (s.total - s.examined) / rate if rate > 0 else 0.0
        line = (f"mkv-rebalance: {state}: examined {s.examined}/{s.total}, "
                f"moved {s.moved}, copies {s.copies}, sidecars {s.sidecars}, "
                f"deletions {s.deletions}, pending deletes finished {s.cleaned}, "
                f"{s.bytes / 1e6:.1f} MB, errors {len(s.problems)}, {rate:.0f} keys/s")
        if state == "progress":
            return line + f", ETA {eta:.0f}s"
        line += f", {elapsed:.1f}s"
        if state == "interrupted":
            line += (f"; {s.interrupted} moves cut short (their copies removed), "
                     f"{s.total - s.examined} keys not examined: run it again to finish")
        return line

    def _progress(self, stop: threading.Event, show: Progress) -> None:
        started = time.monotonic()
        while not stop.wait(show.interval):
            show.show(self._line(time.monotonic() - started))


def dry_run(cfg: Config, out=sys.stdout) -> Counter:
    """The plan from the index alone (copies assumed good): nothing is contacted or changed."""
    ring = cfg.ring()
    reader = Reader(schema.connect(cfg.db, synchronous=cfg.synchronous))
    plan: Counter = Counter()
    # per volume: bytes copied onto it and bytes deleted from it (a weight or a domain
    # changed: where the disks fill and empty)
    onto: Counter = Counter()
    off: Counter = Counter()
    after = ""
    while page := reader.scan(after, PAGE):
        after = page[-1].key
        for rec in page:
            plan["keys"] += 1
            if rec.state is State.DELETING:
                plan["pending_deletes"] += 1
                plan["deletions"] += len(rec.volumes)
                continue
            desired = ring.place(rec.key, cfg.replicas)
            have = set(rec.volumes)
            move = core.rebalance_plan(rec, desired, have, have)
            if move.in_place(rec):
                continue
            plan["keys_to_move"] += 1
            plan["copies"] += len(move.copy_to)
            plan["deletions"] += len(move.drop)
            plan["bytes"] += rec.size * len(move.copy_to)
            for vol in move.copy_to:
                onto[vol] += rec.size
            for vol in move.drop:
                off[vol] += rec.size
    print(f"mkv-rebalance: dry run: {plan['keys']} keys, {plan['keys_to_move']} to move, "
          f"{plan['copies']} copies ({_size(plan['bytes'])}), {plan['deletions']} deletions, "
          f"{plan['pending_deletes']} pending deletes; nothing changed", file=out)
    for vol in sorted(onto.keys() | off.keys()):
        print(f"  {vol}: {_size(onto[vol])} to copy onto it, {_size(off[vol])} to delete",
              file=out)
    return plan


def _size(n: int) -> str:
    return f"{n} bytes, {n / 1e6:.1f} MB"


def stop_on_signals(rebalancer: Rebalancer) -> dict[str, int]:
    """SIGINT and SIGTERM stop the run in order; a second one ends the process at once.
    The returned dict gets the signal that came, for the exit code."""
    got: dict[str, int] = {}

    def handle(signum: int, frame: object) -> None:
        if got:
            os.write(2, b"mkv-rebalance: stopping at once\n")
            os._exit(128 + got["signal"])
        got["signal"] = signum
        os.write(2, b"\nmkv-rebalance: stopping: finishing the keys in hand "
                    b"(again to stop at once)\n")
        rebalancer.interrupt()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)
    return got


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the run's own handling is in place: nothing done yet
        print("mkv-rebalance: interrupted; nothing changed", file=sys.stderr)
        return 128 + signal.SIGINT


def _main(argv: list[str] | None) -> int:
    cfg, ns = config_mod.load(argv, prog="mkv-rebalance",
                              description="Move blobs to match the configured volumes.",
                              extend=add_arguments)
    if ns.concurrency < 1 or ns.limit_rate < 0:
        print("mkv-rebalance: --concurrency must be >= 1 and --limit-rate >= 0", file=sys.stderr)
        return 2
    try:
        Reader(schema.connect(cfg.db)).count()
    except Exception as exc:  # noqa: BLE001 - any reason the index cannot be read
        print(f"mkv-rebalance: cannot read the index {cfg.db}: {exc}", file=sys.stderr)
        return 2
    if ns.dry_run:
        dry_run(cfg)
        return 0
    own_writer = None
    if not writer_running(cfg.db):
        # the service is stopped: run a writer here, which also keeps a service from
        # starting on this index until the rebalance is over
        own_writer = serve_in_thread(cfg.db, cfg.writer_socket)
    try:
        rebalancer = Rebalancer(cfg, concurrency=ns.concurrency, limit_rate=ns.limit_rate,
                                verify=ns.verify, quiet=ns.quiet)
        interrupted = stop_on_signals(rebalancer)
        stats = rebalancer.run()
    finally:
        if own_writer is not None:
            server, thread = own_writer
            server.stop()
            thread.join(10)
    if stats.problems:
        print(f"mkv-rebalance: {len(stats.problems)} keys could not be put in place:",
              file=sys.stderr)
        for key, why in sorted(stats.problems.items()):
            print(f"  {key!r}: {why}", file=sys.stderr)
    if interrupted:
        return 128 + interrupted["signal"]
    return 1 if stats.problems else 0


if __name__ == "__main__":
    sys.exit(main())
