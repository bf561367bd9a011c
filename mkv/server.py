"""Running the service under gunicorn: the application, its hooks, and the
per-worker state that must be opened after fork.

`mkv serve` and plain `gunicorn -c python:mkv.gunicorn_conf mkv.wsgi:app`
share these hooks: the master starts the writer before any worker exists and
stops it after the workers have drained.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.config import Config as GunicornConfig


def _share_metrics_between_workers() -> None:
    """prometheus_client picks its storage when first imported, so the multiprocess
    directory must be in the environment before anything imports mkv.metrics. The
    directory belongs to the process that made it and goes when that process exits
    (any exit but SIGKILL); the workers it forks inherit the hook and leave it alone."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mkv-metrics-")
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)


_share_metrics_between_workers()

from mkv import config as config_mod
from mkv import index, metrics
from mkv.config import Config
from mkv.freshness import ChangeCount, RecordCache
from mkv.health import FailureReporter, health_socket_path
from mkv.store import Store
from mkv.supervise import Child, Supervisor
from mkv.volume import VolumePool
from mkv.writer import WriterClient, wait_ready

log = logging.getLogger("mkv.server")

_config: Config | None = None
_supervisor: Supervisor | None = None
_changes: ChangeCount | None = None


def set_config(cfg: Config) -> None:
    global _config
    _config = cfg


def get_config() -> Config:
    """The service's config: set by `mkv serve`, else read from MKV_* / MKV_CONFIG."""
    global _config
    if _config is None:
        _config, _ = config_mod.load([], prog="mkv serve")
    return _config


# --- per-worker state, built lazily after fork -----------------------------------------

_store: Store | None = None
_store_lock = threading.Lock()


def _forget_store_after_fork() -> None:
    """A forked child never reuses its parent's sockets, threads or SQLite connections."""
    global _store, _store_lock
    _store = None
    _store_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_store_after_fork)


def worker_store() -> Store:
    """This process's Store, built on first use (after the fork)."""
    global _store
    if _store is None:
        with _store_lock:
            if _store is None:
                cfg = get_config()
                reader = index.Reader(lambda: index.connect(cfg.db, synchronous=cfg.synchronous),
                                      RecordCache(_changes) if _changes is not None else None)
                pool = VolumePool(cfg.volume_timeout, maxsize=cfg.threads * 2)
                _store = Store(cfg, reader, pool,
                               lambda: WriterClient(cfg.writer_socket, timeout=cfg.volume_timeout * 3),
                               FailureReporter(health_socket_path(cfg.db)))
    return _store


# --- hooks -----------------------------------------------------------------------------


def children(cfg: Config, changes: ChangeCount) -> list[Child]:
    """The processes `mkv serve` runs beside the workers: writer first, then health."""
    py = [sys.executable, "-m"]
    me = ["--parent", str(os.getpid())]
    writer = Child("writer", [*py, "mkv.writer", "--db", cfg.db, "--socket", cfg.writer_socket,
                              "--synchronous", cfg.synchronous, "--log-level", cfg.log_level,
                              "--changes-fd", str(changes.fd), *me],
                   ready=lambda: wait_ready(cfg.writer_socket, timeout=15),
                   pass_fds=(changes.fd,))
    health = Child("health", [*py, "mkv.health", "--db", cfg.db, "--volumes", ",".join(cfg.volumes),
                              "--writer-socket", cfg.writer_socket,
                              "--interval", str(cfg.health_interval),
                              "--timeout", str(cfg.health_timeout),
                              "--fail-count", str(cfg.health_fail_count),
                              "--ok-count", str(cfg.health_ok_count),
                              "--log-level", cfg.log_level, *me])
    return [writer, health]


def on_starting(server: Any) -> None:
    """Master, before forking workers: start and supervise the writer and health processes."""
    global _supervisor, _changes
    _changes = ChangeCount.create()  # the workers inherit it when they are forked
    _supervisor = Supervisor(children(get_config(), _changes))
    _supervisor.start()


def post_worker_init(worker: Any) -> None:
    """Workers leave Ctrl-C to the master, which stops them with SIGQUIT.

    A terminal's Ctrl-C reaches every process in the group; a gthread worker that gets
    both SIGINT and the master's SIGQUIT re-enters its quit handler and deadlocks in its
    thread pool's shutdown until the master SIGKILLs it 30 s later.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def child_exit(server: Any, worker: Any) -> None:
    metrics.worker_exited(worker.pid)


def on_exit(server: Any) -> None:
    """Master, after the workers are gone: stop the health process and the writer."""
    if _supervisor is not None:
        _supervisor.stop()


def gunicorn_settings(cfg: Config) -> dict[str, Any]:
    """Everything gunicorn needs, shared by `mkv serve` and the gunicorn config file."""
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
        "proc_name": "mkv",
        "on_starting": on_starting,
        "post_worker_init": post_worker_init,
        "child_exit": child_exit,
        "on_exit": on_exit,
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
        from mkv.wsgi import app

        return app


def serve(cfg: Config) -> int:
    set_config(cfg)
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s [%(process)d] [%(name)s] %(levelname)s %(message)s")
    MkvApplication(cfg).run()
    return 0
