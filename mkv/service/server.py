"""Running the service under gunicorn: its settings, the master's hooks, and each
worker's Store, built after the fork.

`mkv serve` (MkvApplication) and plain `gunicorn -c python:mkv.service.gunicorn_conf
mkv.service.wsgi:app` share these settings and hooks: the master starts the writer and
health processes before any worker exists and stops them after the workers have drained
(docs/design.md, "Processes").
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from typing import Any

from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from gunicorn.config import Config as GunicornConfig

from mkv import core, logs
from mkv.config import Config
from mkv.health.reporter import FailureReporter, health_socket_path
from mkv.index import schema
from mkv.index.cache import ChangeCount, RecordCache
from mkv.index.reader import Reader
from mkv.service import metrics
from mkv.service.app import create_app
from mkv.service.store import Store
from mkv.service.supervise import Child, Supervisor
from mkv.volumes.pool import Pool
from mkv.writer.client import WriterClient, wait_ready

log = logging.getLogger("mkv.server")

#: The master hands the workers the shared change count's descriptor in this variable
#: (they inherit both across the fork), so the app needs no module-level state.
CHANGES_FD_ENV = "MKV_CHANGES_FD"


def build_store(cfg: Config, changes: ChangeCount | None) -> Store:
    """One worker's Store: its own index connections, volume connections and writer clients."""
    reader = Reader(lambda: schema.connect(cfg.db, synchronous=cfg.synchronous),
                    RecordCache(changes) if changes is not None else None)
    return Store(cfg, reader, Pool(cfg.volume_timeout),
                 lambda: WriterClient(cfg.writer_socket, timeout=cfg.volume_timeout * 3),
                 FailureReporter(health_socket_path(cfg.db)))


class WorkerStore:
    """The `store` create_app calls per request: this process's Store, built on first use.

    Built lazily because gunicorn forks workers after loading nothing of ours, and a
    forked child must never reuse a parent's sockets, threads or SQLite connections: a
    Store made in another process (before a fork) is not reused.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._store: Store | None = None
        self._lock = threading.Lock()
        # a child forgets its parent's Store at the fork, so no request pays for the check
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._store = None
        self._lock = threading.Lock()

    def __call__(self) -> Store:
        store = self._store
        if store is not None:
            return store
        with self._lock:
            if self._store is None:
                fd = os.environ.get(CHANGES_FD_ENV)
                self._store = build_store(self.cfg, ChangeCount(int(fd)) if fd else None)
            return self._store


def worker_app(cfg: Config) -> Any:
    """The WSGI app a worker serves."""
    return create_app(cfg, WorkerStore(cfg))


def children(cfg: Config, changes: ChangeCount) -> list[Child]:
    """The processes `mkv serve` runs beside the workers: writer first, then health."""
    py = [sys.executable, "-m"]
    me = ["--parent", str(os.getpid())]
    writer = Child("writer", [*py, "mkv.writer", "--db", cfg.db, "--socket", cfg.writer_socket,
                              "--synchronous", cfg.synchronous, "--log-level", cfg.log_level,
                              "--log-format", cfg.log_format,
                              "--changes-fd", str(changes.fd), *me],
                   ready=lambda: wait_ready(cfg.writer_socket, timeout=15),
                   pass_fds=(changes.fd,))
    health = Child("health", [*py, "mkv.health", "--db", cfg.db, "--volumes", ",".join(cfg.volumes),
                              "--writer-socket", cfg.writer_socket,
                              "--interval", str(cfg.health_interval),
                              "--timeout", str(cfg.health_timeout),
                              "--fail-count", str(cfg.health_fail_count),
                              "--ok-count", str(cfg.health_ok_count),
                              "--orphan-after", str(core.orphan_grace(cfg.volume_timeout,
                                                                      cfg.client_timeout)),
                              "--log-level", cfg.log_level, "--log-format", cfg.log_format,
                              *me])
    return [writer, health]


def gunicorn_logger(log_format: str) -> type[glogging.Logger]:
    """gunicorn's logger class, writing gunicorn's own lines in mkv's format (mkv.logs):
    its error log goes to the root logger, which `logs.setup` gives mkv's handler. Its
    access log stays off: the service writes its own (mkv.service.requestlog)."""

    class MkvGunicornLogger(glogging.Logger):
        def setup(self, cfg: Any) -> None:  # also run by gunicorn's reload
            super().setup(cfg)
            logs.setup(cfg.loglevel, log_format, "serve")
            for handler in list(self.error_log.handlers):
                if getattr(handler, "_gunicorn", False):
                    self.error_log.removeHandler(handler)
            self.error_log.propagate = True

    return MkvGunicornLogger


class Hooks:
    """gunicorn's server hooks for one service; holds what the master starts."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.supervisor: Supervisor | None = None

    def on_starting(self, server: Any) -> None:
        """Master, before forking workers: start and supervise the writer and health."""
        changes = ChangeCount.create()
        os.environ[CHANGES_FD_ENV] = str(changes.fd)  # inherited by every worker
        # a worker's lines say so from its first ("Booting worker"), logged before any hook
        os.register_at_fork(after_in_child=functools.partial(logs.set_process_name, "worker"))
        self.supervisor = Supervisor(children(self.cfg, changes))
        self.supervisor.start()

    def post_worker_init(self, worker: Any) -> None:
        """Workers leave Ctrl-C to the master, which stops them with SIGQUIT.

        A terminal's Ctrl-C reaches every process in the group; a gthread worker that gets
        both SIGINT and the master's SIGQUIT re-enters its quit handler and deadlocks in
        its thread pool's shutdown until the master SIGKILLs it 30 s later.
        """
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def child_exit(self, server: Any, worker: Any) -> None:
        metrics.worker_exited(worker.pid)

    def on_exit(self, server: Any) -> None:
        """Master, after the workers are gone: stop the health process and the writer."""
        if self.supervisor is not None:
            self.supervisor.stop()


def gunicorn_settings(cfg: Config) -> dict[str, Any]:
    """Everything gunicorn needs, shared by `mkv serve` and the gunicorn config file."""
    hooks = Hooks(cfg)
    settings = {
        "bind": [f"{cfg.bind}:{cfg.port}"],
        "workers": cfg.workers,
        "worker_class": "gthread",
        "threads": cfg.threads,
        # gthread heartbeats from its main thread, so a long upload never trips this.
        "timeout": 60,
        "graceful_timeout": 30,
        "keepalive": 5,
        "loglevel": cfg.log_level,
        "errorlog": "-",
        "accesslog": None,
        "logger_class": gunicorn_logger(cfg.log_format),
        "proc_name": "mkv",
        "on_starting": hooks.on_starting,
        "post_worker_init": hooks.post_worker_init,
        "child_exit": hooks.child_exit,
        "on_exit": hooks.on_exit,
    }
    if "control_socket_disable" in GunicornConfig().settings:
        # a fixed-path control socket would collide between services on one machine
        settings["control_socket_disable"] = True
    return settings


class MkvApplication(BaseApplication):
    """gunicorn run in-process by `mkv serve`, configured from our Config."""

    def __init__(self, cfg: Config) -> None:
        self.cfg_mkv = cfg
        super().__init__()

    def load_config(self) -> None:
        for name, value in gunicorn_settings(self.cfg_mkv).items():
            self.cfg.set(name, value)

    def load(self) -> Any:
        return worker_app(self.cfg_mkv)


def serve(cfg: Config) -> int:
    """`mkv serve`: the caller has set up the metrics directory (mkv.service.metricsdir)."""
    logs.setup(cfg.log_level, cfg.log_format, "serve")
    MkvApplication(cfg).run()
    return 0
