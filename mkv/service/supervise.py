"""Keeping the writer and health processes alive under the gunicorn master.

A thread in the master polls its children and restarts any that died: at once the
first time, then, while it keeps dying within STABLE_AFTER seconds of its start, after
growing delays (`restart_delay`) rather than in a tight loop. A run of STABLE_AFTER or
more starts the count over. Every exit is logged with its real status or signal: gunicorn's SIGCHLD handler
reaps with waitpid(-1), which would take our children's status too, so the master's
hook calls `Supervisor.reap` first (mkv.service.server.Hooks), collecting each child by
its pid (docs/design.md, "Processes").
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

#: Seconds a child must have run for its death to start the count of deaths in a row
#: over: it is then restarted at once, as after its first death.
STABLE_AFTER = 30.0
#: The delay before the restart after the second death in a row; doubled at each further
#: one, up to MAX_BACKOFF.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0


def restart_delay(deaths_in_a_row: int) -> float:
    """Seconds to wait before restarting a child that died `deaths_in_a_row` times, each
    after the first within STABLE_AFTER of its start: none after one death (a crash is
    repaired at once), then 0.5, 1, 2 ... up to MAX_BACKOFF (a child that cannot start
    must not spin)."""
    if deaths_in_a_row <= 1:
        return 0.0
    return min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (deaths_in_a_row - 2))


def describe_exit(returncode: int | None) -> str:
    """An exit as the log tells it; `returncode` as subprocess has it (negative: the signal),
    None when gunicorn's reaping took the status first."""
    if returncode is None:
        return "exited (status unknown: reaped before the supervisor could see it)"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


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
        self.started_at = 0.0
        #: deaths in a row, each after the first within STABLE_AFTER of its start
        self.deaths_in_a_row = 0
        #: when the next start is due (monotonic), once the supervisor has seen it die
        self.restart_at: float | None = None
        #: the exit status (subprocess's convention), once reaped; None if it was lost
        self.returncode: int | None = None
        self._exited = False
        self._reap_lock = threading.Lock()

    def start(self) -> None:
        self.started_at = time.monotonic()
        # its own process group: a terminal's Ctrl-C reaches the master and its workers,
        # and the master stops this child in order once the workers have drained
        proc = subprocess.Popen(self.argv, process_group=0, pass_fds=self.pass_fds)
        with self._reap_lock:  # swapped with its reaping state in one step, never None between
            self.proc, self._exited, self.returncode = proc, False, None
        if self.ready is not None:
            try:
                self.ready()
            except Exception:
                self.proc.kill()
                self.proc.wait(10)
                raise

    def reap(self) -> bool:
        """True once the process has ended, its status collected by its pid (never blocks).

        The one place our children are waited for, so the status is seen once, whichever
        thread asks first: the supervisor's, or the master's before gunicorn's waitpid(-1).
        """
        with self._reap_lock:
            proc = self.proc
            if proc is None or self._exited:
                return self._exited
            try:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: the status is gone
                pid, status = proc.pid, None
            if pid == 0:
                return False
            self._exited = True
            self.returncode = os.waitstatus_to_exitcode(status) if status is not None else None
            # Popen must not wait for this pid again: the kernel may give it to another child
            proc.returncode = self.returncode if self.returncode is not None else 0
            return True

    def alive(self) -> bool:
        return self.proc is not None and not self.reap()

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Supervisor:
    """Starts the children, then restarts any that dies (see the module's docstring).

    `on_restart(name)` is called at every restart (the master counts them in
    mkv_child_restarts_total); `stable_after` is STABLE_AFTER unless a test shortens it.
    """

    def __init__(self, children: list[Child], poll: float = 0.2,
                 on_restart: Callable[[str], None] | None = None,
                 stable_after: float = STABLE_AFTER) -> None:
        self.children = children
        self.poll = poll
        self.on_restart = on_restart
        self.stable_after = stable_after
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

    def reap(self) -> None:
        """Collect the status of every child that has ended; the master calls this before
        gunicorn's own reaping, which would take it otherwise."""
        for child in self.children:
            child.reap()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            for child in self.children:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self._tend(child)

    def _tend(self, child: Child) -> None:
        """Notice a death (log it, schedule the restart), or restart once it is due."""
        now = time.monotonic()
        if child.restart_at is None:
            if child.alive():
                return
            ran = now - child.started_at
            pid = child.proc.pid if child.proc is not None else "none"
            self._died(child, f"(pid {pid}) {describe_exit(child.returncode)} after {ran:.1f} s",
                       ran, now)
        if now < child.restart_at:
            return
        child.restart_at = None
        child.restarts += 1
        if self.on_restart is not None:
            self.on_restart(child.name)
        try:
            child.start()
        except Exception as exc:  # noqa: BLE001 - a failed start is one more quick death
            self._died(child, f"failed to start: {exc}", 0.0, time.monotonic())
            return
        log.info("%s restarted (pid %d)", child.name, child.proc.pid)

    def _died(self, child: Child, what: str, ran: float, now: float) -> None:
        child.deaths_in_a_row = 1 if ran >= self.stable_after else child.deaths_in_a_row + 1
        delay = restart_delay(child.deaths_in_a_row)
        child.restart_at = now + delay
        if delay:
            log.error("%s %s; restarting in %.1f s (%d exits in a row, each within %.0f s "
                      "of its start)", child.name, what, delay, child.deaths_in_a_row,
                      self.stable_after)
        else:
            log.error("%s %s; restarting now", child.name, what)

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
                    child.restart_at = None  # started here, not by the watch loop
                    try:
                        child.start()
                    except Exception as exc:  # noqa: BLE001 - the watch loop tries again
                        self._died(child, f"failed to start: {exc}", 0.0, time.monotonic())
                        return
                    log.info("%s restarted with the new configuration (pid %d)", name, child.proc.pid)
