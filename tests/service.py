"""A real `mkv serve` for integration tests: own process group, free port, temp files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from mkv.writer.lockfile import writer_running
from tests.cluster import free_port, group_alive


class ServiceStartError(RuntimeError):
    pass


class MkvService:
    """`python -m mkv serve ...` started in its own session, stopped with its whole tree."""

    def __init__(self, workdir: Path, volumes: Sequence[str], *, replicas: int = 3,
                 workers: int = 2, extra: Sequence[str] = (), env: dict | None = None,
                 db: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.db = db or str(self.workdir / "index.db")
        self.volumes = list(volumes)
        self.replicas = replicas
        self.workers = workers
        self.extra = list(extra)
        self.env = env or {}
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "serve.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        return [sys.executable, "-m", "mkv", "serve", "--bind", "127.0.0.1",
                "--port", str(self.port), "--volumes", ",".join(self.volumes),
                "--replicas", str(self.replicas), "--db", self.db,
                "--workers", str(self.workers), *self.extra]

    def start(self, timeout: float = 20.0) -> MkvService:
        self.port = free_port()
        # temporary files in the workdir (the metrics directory is beside the index: db)
        env = {**os.environ, "TMPDIR": str(self.workdir), **self.env}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.args(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceStartError(f"mkv serve exited {self.proc.returncode}:\n{self.output()}")
            try:
                requests.get(self.url + "/-/health", timeout=5)
                return self
            except requests.RequestException:
                time.sleep(0.05)
        self.kill()
        raise ServiceStartError(f"mkv serve not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the master (graceful), wait for the whole process group to go."""
        if self.proc is None:
            return None
        pgid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._reap_group(pgid)
        code = self.proc.returncode
        self.proc = None
        self._wait_writer_gone()
        return code

    def kill(self) -> None:
        if self.proc is not None:
            self._reap_group(self.proc.pid)
            self.proc = None
            self._wait_writer_gone()

    def _wait_writer_gone(self, timeout: float = 10.0) -> None:
        """The writer runs in a process group of its own and, with its master killed,
        stops by itself a moment later: wait until it has let go of the index."""
        deadline = time.monotonic() + timeout
        while writer_running(self.db) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _reap_group(self, pgid: int) -> None:
        deadline = time.monotonic() + 5
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def pids(self, name: str) -> list[int]:
        """Pids of this service (its process group, and the master's children with
        groups of their own) whose command line contains `name`."""
        out = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                pid = int(cmdline.parent.name)
                ppid = int((cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if self.proc.pid not in (os.getpgid(pid), ppid):
                    continue
                if name in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(pid)
            except (OSError, ValueError):
                continue
        return out

    def __enter__(self) -> MkvService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FileService(MkvService):
    """`mkv serve --config FILE`, every setting in the file, so a reload can change any."""

    def __init__(self, workdir: Path, volumes: list[str], conf: dict[str, str] | None = None,
                 **kw: object) -> None:
        super().__init__(workdir, volumes, **kw)
        self.conf = self.workdir / "mkv.conf"
        self.settings: dict[str, str] = {}
        self.initial = conf or {}  # settings of the file at start, beyond the ones below

    def write_conf(self, **changes: str) -> None:
        self.settings.update({k.replace("_", "-"): v for k, v in changes.items()})
        text = "".join(f"{k} = {v}\n" for k, v in self.settings.items())
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.conf)

    def args(self) -> list[str]:
        self.write_conf(volumes=",".join(self.volumes), replicas=str(self.replicas), db=self.db,
                        bind="127.0.0.1", port=str(self.port), workers=str(self.workers),
                        health_interval="0.2", health_timeout="0.5", **self.initial)
        return [*super().args()[:4], "--config", str(self.conf), *self.extra]

    def hup(self) -> None:
        os.kill(self.proc.pid, signal.SIGHUP)

    def health(self) -> dict:
        return requests.get(self.url + "/-/health", timeout=5).json()
