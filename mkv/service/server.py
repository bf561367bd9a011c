"""Running the service under gunicorn: its settings, the master's hooks, and each
worker's Store, built after the fork.

`mkv serve` (MkvApplication) and plain `gunicorn -c python:mkv.service.gunicorn_conf
mkv.service.wsgi:app` share these settings and hooks: the master starts the writer and
health processes before any worker exists and stops them after the workers have drained
(docs/design.md, "Processes").
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
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
from mkv.repair.settings import settings as repair_settings
from mkv.service import childmetrics, metrics, ratelimit, reload
from mkv.service.app import create_app
from mkv.service.store import Store
from mkv.service.supervise import Child, Supervisor
from mkv.volumes.pool import Pool
from mkv.writer.client import WriterClient, wait_ready
from mkv.writer.protocol import WriterError

log = logging.getLogger("mkv.server")

#: The master hands the workers the shared change count's descriptor in this variable
#: (they inherit both across the fork), so the app needs no module-level state.
CHANGES_FD_ENV = "MKV_CHANGES_FD"
#: ... and the list requests' token bucket (mkv.service.ratelimit), shared the same way.
LIST_BUCKET_FD_ENV = "MKV_LIST_BUCKET_FD"
#: ... and the configuration in force, as JSON (changed by a reload): Hooks.publish_config.
CONFIG_ENV = "MKV_SERVE_CONFIG"


def build_store(cfg: Config, changes: ChangeCount | None) -> Store:
    """One worker's Store: its own index connections, volume connections and writer clients."""
    reader = Reader(lambda: schema.connect(cfg.db, synchronous=cfg.synchronous),
                    RecordCache(changes) if changes is not None else None)
    return Store(cfg, reader, Pool(cfg.volume_timeout, on_request=metrics.volume_request),
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
    fd = os.environ.get(LIST_BUCKET_FD_ENV)
    limiter = ratelimit.ListLimiter(cfg.list_rate, cfg.list_burst, int(fd) if fd else None)
    return create_app(cfg, WorkerStore(cfg), limiter)


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
    # mends queued copies and scrubs: docs/design.md, "Self-healing"
    repair = Child("repair", [*py, "mkv.repair", "--settings", repair_settings(cfg), *me])
    return [writer, health, repair]


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
    """gunicorn's server hooks for one service; holds what the master starts, and the
    configuration in force (changed by a SIGHUP: docs/design.md, "Reload")."""

    def __init__(self, cfg: Config, argv: Sequence[str] = ()) -> None:
        self.cfg = cfg
        self.argv = list(argv)  # `mkv serve`'s flags, read again with the file on SIGHUP
        self.supervisor: Supervisor | None = None
        self.changes: ChangeCount | None = None

    def on_starting(self, server: Any) -> None:
        """Master, before forking workers: start and supervise the writer and health.

        gunicorn reaps with waitpid(-1) when a child exits, which would collect our
        children's exit status too and leave the supervisor nothing to log. Its reaping
        is wrapped so the supervisor first collects its own children, by pid.
        """
        # a worker's lines say so from its first ("Booting worker"), logged before any hook
        os.register_at_fork(after_in_child=functools.partial(logs.set_process_name, "worker"))
        self.changes = ChangeCount.create()
        os.environ[CHANGES_FD_ENV] = str(self.changes.fd)  # inherited by every worker
        os.environ[LIST_BUCKET_FD_ENV] = str(ratelimit.create())
        publish_config(self.cfg)
        procs = children(self.cfg, self.changes)
        childmetrics.zero(c.name for c in procs)
        supervisor = self.supervisor = Supervisor(procs, on_restart=childmetrics.restarted)
        gunicorn_reap = server.reap_workers

        def reap_workers() -> None:
            try:
                supervisor.reap()
            except Exception:  # noqa: BLE001 - never in the way of gunicorn's own reaping
                log.exception("collecting the writer's and health's exit status failed")
            gunicorn_reap()

        server.reap_workers = reap_workers
        supervisor.start()

    def on_reload(self, server: Any) -> None:
        """Master, on SIGHUP, before gunicorn starts the new workers (and gracefully stops
        the old ones): read the configuration again and apply what may change."""
        result = reload.read(self.argv, self.cfg)
        if result is not None:
            self.apply(server, result.config)

    def apply(self, server: Any, new: Config) -> None:
        old, self.cfg = self.cfg, new
        # the workers gunicorn forks next are built from these (MkvApplication.load, wsgi.py)
        publish_config(new)
        server.cfg.set("workers", new.workers)
        server.cfg.set("threads", new.threads)
        server.num_workers = new.workers
        server.cfg.set("loglevel", new.log_level)
        logs.setup(new.log_level, new.log_format, "serve")  # the new workers inherit it
        server.log.error_log.setLevel(new.log_level.upper())
        if self.supervisor is None or self.changes is None:
            return
        if (old.synchronous, old.log_level) != (new.synchronous, new.log_level):
            try:
                WriterClient(new.writer_socket, timeout=5).configure(new.synchronous, new.log_level)
            except WriterError as exc:  # restarting: it starts with the new argv below
                log.warning("reload: the writer did not take the new settings now: %s", exc)
        writer, health, repair = children(new, self.changes)
        self.supervisor.reconfigure("writer", writer.argv, restart=False)
        # the health process probes the new volume list at once
        self.supervisor.reconfigure("health", health.argv, restart=True)
        self.supervisor.reconfigure("repair", repair.argv, restart=True)

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


def publish_config(cfg: Config) -> None:
    """The configuration in force, for workers that read their own (plain gunicorn's
    mkv.service.wsgi): after a reload it is the master's decision, not the raw file."""
    os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(cfg))


def published_config() -> Config | None:
    """The master's configuration in force, if this process was forked by one."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        return None
    fields = json.loads(text)
    # JSON has lists where the Config has tuples (volumes, public_urls, weights, domains):
    # turned back, so the workers' Config equals (and hashes like) the master's
    return Config(**{name: tuple(tuple(x) if isinstance(x, list) else x for x in value)
                     if isinstance(value, list) else value for name, value in fields.items()})


def gunicorn_settings(cfg: Config, hooks: Hooks | None = None) -> dict[str, Any]:
    """Everything gunicorn needs, shared by `mkv serve` and the gunicorn config file."""
    hooks = hooks if hooks is not None else Hooks(cfg)
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
        "on_reload": hooks.on_reload,
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

    def __init__(self, cfg: Config, argv: Sequence[str] = ()) -> None:
        self.hooks = Hooks(cfg, argv)
        super().__init__()

    def load_config(self) -> None:
        # on a reload too: the settings in force now; the on_reload hook then applies
        # the new configuration before gunicorn forks the new workers
        for name, value in gunicorn_settings(self.hooks.cfg, self.hooks).items():
            self.cfg.set(name, value)

    def load(self) -> Any:
        return worker_app(self.hooks.cfg)


def serve(cfg: Config, argv: Sequence[str] = ()) -> int:
    """`mkv serve`: the caller has set up the metrics directory (mkv.service.metricsdir)."""
    logs.setup(cfg.log_level, cfg.log_format, "serve")
    MkvApplication(cfg, argv).run()
    return 0
