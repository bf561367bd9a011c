"""The directory where gunicorn workers' Prometheus values meet (multiprocess mode).

prometheus_client chooses its storage when it is first imported, so the entry points
(`mkv serve`, the gunicorn config file) call `share_between_workers` before anything
imports mkv.service.metrics. Nothing else does: importing mkv has no side effects.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_between_workers() -> str:
    """Make the directory (unless the environment names one already) and return it.

    It belongs to the process that made it and goes when that process exits (any exit
    but SIGKILL); the workers it forks inherit the exit hook and leave it alone.
    """
    if os.environ.get(ENV):
        return os.environ[ENV]
    path = os.environ[ENV] = tempfile.mkdtemp(prefix="mkv-metrics-")
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    return path
