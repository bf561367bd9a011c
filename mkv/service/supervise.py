"""Keeping the writer and health processes alive under the gunicorn master.

A thread in the master polls its children and restarts any that died, with a
short backoff so a child that cannot start does not spin. gunicorn's own child
reaping may collect our processes' exit status first; Popen then reports them
as exited, which is all the supervisor needs to know.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

log = logging.getLogger("mkv.service.supervise")


def on_stop(stop: Callable[[], None], parent: int = 0, poll: float = 0.5) -> None:
    """Call `stop` on SIGTERM or SIGINT; with `parent`, as a supervised child instead:
    on SIGTERM, or when the master is gone.

    The master stops its children in order, after its workers have drained; a
    stray SIGINT is ignored. A master killed outright cannot stop anything, so
    the child also watches for being orphaned and stops by itself rather than
    hold the index and its socket.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: stop())
    if not parent:
        signal.signal(signal.SIGINT, lambda signum, frame: stop())
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        log.warning("the mkv serve master (pid %d) is gone; stopping", parent)
        stop()

    threading.Thread(target=watch, name="mkv-parent-watch", daemon=True).start()


class Child:
    """One supervised process: how to start it, and how to tell it is ready."""

    def __init__(self, name: str, argv: list[str], ready: Callable[[], None] | None = None,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.name = name
        self.argv = argv
        self.ready = ready
        self.pass_fds = pass_fds
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        # its own process group: a terminal's Ctrl-C reaches the master and its workers,
        # and the master stops this child in order once the workers have drained
        self.proc = subprocess.Popen(self.argv, process_group=0, pass_fds=self.pass_fds)
        if self.ready is not None:
            try:
                self.ready()
            except Exception:
                self.proc.kill()
                raise

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Supervisor:
    def __init__(self, children: list[Child], poll: float = 0.2) -> None:
        self.children = children
        self.poll = poll
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start every child (failing loudly if one cannot start), then watch them."""
        for child in self.children:
            child.start()
            log.info("%s started (pid %d)", child.name, child.proc.pid)
        self._thread = threading.Thread(target=self._watch, name="mkv-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        backoff = {c.name: 0.0 for c in self.children}
        while not self._stop.wait(self.poll):
            for child in self.children:
                with self._lock:
                    if self._stop.is_set() or child.alive():
                        continue
                    code = child.proc.returncode if child.proc else None
                    log.error("%s exited (%s); restarting", child.name, code)
                    time.sleep(backoff[child.name])
                    try:
                        child.start()
                        child.restarts += 1
                        backoff[child.name] = 0.0
                        log.info("%s restarted (pid %d)", child.name, child.proc.pid)
                    except Exception as exc:  # noqa: BLE001 - keep trying, a bit slower
                        backoff[child.name] = min(max(backoff[child.name] * 2, 0.5), 5.0)
                        log.error("%s failed to restart: %s", child.name, exc)

    def stop(self) -> None:
        """Stop watching, then stop the children (the writer last: it may get final writes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            for child in reversed(self.children):
                child.stop()
                log.info("%s stopped", child.name)

    def reconfigure(self, name: str, argv: list[str], restart: bool) -> None:
        """Start child `name` with `argv` from now on; with `restart`, at once (stopped
        first, then started: the same as a crash and restart, only without the wait)."""
        with self._lock:
            for child in self.children:
                if child.name != name or child.argv == argv:
                    continue
                child.argv = argv
                if restart and not self._stop.is_set():
                    child.stop()
                    child.start()
                    log.info("%s restarted with the new configuration (pid %d)", name, child.proc.pid)
