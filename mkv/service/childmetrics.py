"""The supervisor's restarts of the writer and health processes, as a Prometheus counter.

Apart from mkv.service.supervise, which the writer and health processes import too (for
`on_stop`): only the master imports this, after its metrics directory is set up, so the
value lands beside the workers' and /-/metrics sums it with theirs.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter

CHILD_RESTARTS = Counter("mkv_child_restarts_total",
                         "Restarts of a supervised process (writer, health, repair) by the mkv master",
                         ["child"])


def zero(names: Iterable[str]) -> None:
    """Show every child's counter from the start, at 0, not only after its first restart."""
    for name in names:
        CHILD_RESTARTS.labels(name)


def restarted(name: str) -> None:
    CHILD_RESTARTS.labels(name).inc()
