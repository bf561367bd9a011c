"""The directory where the service's processes meet their Prometheus values
(prometheus_client's multiprocess mode): `<db>.metrics/`, beside the index.

Every process of the service writes its values there: the workers, and the writer,
which the master starts with its own environment. prometheus_client chooses its storage
when it is first imported, so the entry points (`mkv serve`, the gunicorn config file)
call `share_between_workers` before anything imports prometheus_client. Nothing else
does: importing mkv has no side effects.

A master killed outright (SIGKILL) leaves its files behind, and the next start would sum
them with its own (and a dead worker's live gauges would never go). So a start empties
the directory first, unless a writer is running on that index: then another service
(or an offline mkv-rebalance) owns the directory, and the start is refused.
docs/design.md, "Processes".
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path

from mkv.writer.lockfile import lock_path, writer_running

ENV = "PROMETHEUS_MULTIPROC_DIR"

#: How long a start waits for the writer of a master killed a moment ago to notice and
#: stop (it polls its parent every 0.5 s; mkv.service.supervise.on_stop).
WRITER_GONE_WAIT = 5.0


class MetricsDirBusy(RuntimeError):
    """Another service's writer runs on this index: its metrics directory is not ours."""


class ImportedTooEarly(RuntimeError):
    """prometheus_client was imported before the directory was set: it would not see it."""


def metrics_dir(db: str) -> str:
    return db + ".metrics"


def _values(path: Path) -> list[Path]:
    """prometheus_client's files in the directory (`<kind>_<pid>.db`): nothing else is
    touched, whatever else an operator keeps there."""
    return sorted(path.glob("*.db"))


def clean(db: str, wait: float = WRITER_GONE_WAIT) -> str:
    """Make `<db>.metrics/` and empty it of the values a killed master left; the path.

    Raises MetricsDirBusy when a writer still holds the index after `wait` seconds.
    """
    path = Path(metrics_dir(db))
    path.mkdir(mode=0o700, exist_ok=True)
    deadline = time.monotonic() + wait
    while writer_running(db):
        if time.monotonic() >= deadline:
            raise MetricsDirBusy(f"a writer is running on {db} (it holds {lock_path(db)}): "
                                 f"another service uses this index and {path}")
        time.sleep(0.1)
    for stale in _values(path):
        stale.unlink(missing_ok=True)
    return str(path)


def share_between_workers(db: str) -> str:
    """Set PROMETHEUS_MULTIPROC_DIR for this process and every one it starts; the path.

    A directory the environment names already is used as it is (an operator's choice, or
    a second call in the same master: gunicorn reads its config file again on reload).
    The one made here belongs to this process: it empties it when it exits (any exit but
    SIGKILL, which the next start's `clean` covers); the workers it forks inherit the
    exit hook and leave it alone.
    """
    if os.environ.get(ENV):
        return os.environ[ENV]
    if "prometheus_client" in sys.modules:
        raise ImportedTooEarly("prometheus_client is imported already: set the metrics "
                               "directory before anything imports it")
    path = os.environ[ENV] = clean(db)
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:
            for values in _values(Path(path)):
                values.unlink(missing_ok=True)
            try:
                os.rmdir(path)
            except OSError:
                pass  # not empty: something of someone else's is kept there

    atexit.register(remove)
    return path
