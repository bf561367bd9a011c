"""Real processes for integration tests: nginx volumes started from deploy/nginx/.

Plain classes and functions rather than fixtures, so tests can also stop, kill and restart
volumes mid-test (failure injection). Volumes are launched straight from mkv.volumes.nginx's renderer,
i.e. from exactly the config `mkv volume` runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import requests

from mkv.volumes.nginx import (
    ACCESS_LOG_NAME,
    WORKDIR_NAME,
    Disk,
    Network,
    listen_address,
    render_volume,
    volume_command,
)

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_START_ATTEMPTS = 3  # only when the port was picked here: another process may take it first


class VolumeStartError(RuntimeError):
    """nginx exited or never answered; the message carries its stderr."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port of `host` that was free a moment ago; nginx binds with SO_REUSEADDR, so
    TIME_WAIT is fine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = START_TIMEOUT) -> requests.Response:
    """Poll until url answers at all (any status): readiness means nginx accepts and serves."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return requests.get(url, timeout=1.0)
        except (requests.ConnectionError, requests.Timeout):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f}s") from None
            time.sleep(0.02)


def group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process in the group? Zombies hold no sockets or files."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the parenthesised command: state, ppid, pgrp, ...
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process exited while we looked
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


class NginxVolume:
    """One nginx volume in its own session, so its master and workers die as one group.

    By default it serves `root` (the volume host:port) and lets this host write, as `mkv
    volume --root` does. With `disks`, it serves those under their prefixes (the volumes
    host:port/NAME) and `root` only holds its work directory; `writers` and `secret` are
    `mkv volume`'s --writers and --redirect-secret. `host` is the loopback address it
    listens on: 127.0.0.2, 127.0.0.3 ... stand for other machines (Linux answers the whole
    127.0.0.0/8 on the loopback interface).
    """

    def __init__(self, root: Path, port: int, proc: subprocess.Popen[bytes], log: Path, *,
                 disks: Sequence[Disk] = (), writers: Sequence[Network] | None = None,
                 secret: str = "", host: str = "127.0.0.1"):
        self.root = root
        self.port = port
        self.proc = proc
        self.log = log
        self.disks = tuple(disks)
        self.writers = writers
        self.secret = secret
        self.host = host

    @property
    def address(self) -> str:
        """The volume as mkv names it: host:port."""
        return f"{self.host}:{self.port}"

    @property
    def disk_addresses(self) -> list[str]:
        """With disks, the volumes as mkv names them: host:port/NAME each."""
        return [self.address + disk.prefix for disk in self.disks]

    @property
    def workdir(self) -> Path:
        return self.root / WORKDIR_NAME

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @classmethod
    def start(cls, root: Path, port: int | None = None, *, disks: Sequence[Disk] = (),
              writers: Sequence[Network] | None = None, secret: str = "",
              host: str = "127.0.0.1") -> Self:
        """Start nginx on root (or disks), listening on host:port, and return once it
        serves HTTP (or raise VolumeStartError)."""
        attempts = 1 if port is not None else _START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            chosen = port if port is not None else free_port(host)
            try:
                return cls._start_once(Path(root).absolute(), chosen, tuple(disks), writers,
                                       secret, host)
            except VolumeStartError as exc:
                if attempt == attempts or "Address already in use" not in str(exc):
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _start_once(cls, root: Path, port: int, disks: tuple[Disk, ...],
                    writers: Sequence[Network] | None, secret: str, host: str) -> Self:
        workdir = root / WORKDIR_NAME
        conf = render_volume(disks or root, listen_address(host, port), workdir,
                             writers=writers, secret=secret)
        log = workdir / "stderr.log"
        # A file, not a pipe: nobody reads nginx's stderr while it runs, and a full pipe would
        # block its error logging.
        with log.open("wb") as err:
            proc = subprocess.Popen(
                volume_command(conf, workdir),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
        volume = cls(root, port, proc, log, disks=disks, writers=writers, secret=secret,
                     host=host)
        try:
            volume._wait_ready()
        except BaseException:
            volume.kill()  # never leave a half-started nginx behind, whatever went wrong
            raise
        return volume

    def _wait_ready(self) -> None:
        """Wait for *this* nginx's ping: another server may already hold the port."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise VolumeStartError(
                    f"nginx on {self.address} exited with {self.proc.returncode}: {self.stderr()}"
                )
            try:
                resp = requests.get(f"{self.url}/-/ping", timeout=1.0)
                if resp.status_code == 200 and resp.text == "ok\n":
                    return
            except requests.RequestException:
                pass
            time.sleep(0.02)
        raise VolumeStartError(
            f"nginx on {self.address} not ready after {START_TIMEOUT:.0f}s: {self.stderr()}"
        )

    def stderr(self) -> str:
        """What nginx logged so far (its error_log goes to stderr)."""
        try:
            return self.log.read_text(errors="replace").strip()
        except OSError:
            return ""

    @property
    def access_log(self) -> Path:
        """nginx's access log: one line per request, buffered for up to a second."""
        return self.root / WORKDIR_NAME / ACCESS_LOG_NAME

    def access_lines(self) -> list[str]:
        try:
            return self.access_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown), escalating to SIGKILL after STOP_TIMEOUT."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        # The master waits for its workers before exiting; this only guards the odd straggler.
        if not _wait_group_gone(self.proc.pid, STOP_TIMEOUT):
            self.kill()

    def kill(self) -> None:
        """Crash the volume: SIGKILL master and workers at once, as a power cut would."""
        if self.proc.poll() is not None and not group_alive(self.proc.pid):
            return  # already gone: do not signal a group id the kernel may have reused
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        # Orphaned workers may still hold the listening socket for a moment; restart() needs it.
        _wait_group_gone(self.proc.pid, STOP_TIMEOUT)

    def restart(self) -> None:
        """Start again on the same root and port, e.g. after kill() in a failure test."""
        if self.running:
            self.stop()
        fresh = type(self).start(self.root, self.port, disks=self.disks, writers=self.writers,
                                 secret=self.secret, host=self.host)
        self.proc, self.log = fresh.proc, fresh.log

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.proc.returncode}"
        return f"NginxVolume({self.address}, root={self.root}, {state})"
