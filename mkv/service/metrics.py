"""Prometheus metrics of the service: counted by every process, read at scrape time.

prometheus_client's multiprocess mode keeps each process's values in files under
PROMETHEUS_MULTIPROC_DIR (mkv.service.metricsdir: `<db>.metrics/`), and /-/metrics
sums them: the workers' requests and latencies counted here, the writer's commits and
locks (mkv.writer.metrics). Counters of processes that died stay in the sum. What the
index already knows is read when /-/metrics is asked (IndexCollector): the volumes'
published health, and the keys, bytes and pending operations the index's triggers
count. Without the directory (tests, tools) the in-process registry is used.
docs/design.md, "Metrics".
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import apsw
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from mkv import core
from mkv.config import Config
from mkv.core import Health
from mkv.index.reader import Reader
from mkv.model import HealthRow

log = logging.getLogger("mkv.service.metrics")

REQUESTS = Counter("mkv_requests_total", "HTTP requests answered, by method and status",
                   ["method", "status"])
LATENCY = Histogram(
    "mkv_request_seconds", "Time to answer a request, by method (GET and HEAD: the 302)",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
)
PUT_BYTES = Counter("mkv_put_bytes_total", "Value bytes accepted by PUT")
VOLUME_REQUESTS = Counter("mkv_volume_requests_total",
                          "HTTP requests the workers sent to a volume, by volume and method",
                          ["volume", "method"])
VOLUME_ERRORS = Counter("mkv_volume_errors_total",
                        "Volume requests that failed by the volume's fault (refused, timed out, "
                        "5xx), by volume and kind (the error's class)", ["volume", "kind"])


@functools.cache
def _counter(method: str, status: int):  # noqa: ANN202 - a prometheus child
    return REQUESTS.labels(method, status)


@functools.cache
def _histogram(method: str):  # noqa: ANN202
    return LATENCY.labels(method)


@functools.cache
def _volume_requests(volume: str, method: str):  # noqa: ANN202
    return VOLUME_REQUESTS.labels(volume, method)


def observe(method: str, status: int, started: float) -> None:
    """Count one answered request and its time."""
    _counter(method, status).inc()
    _histogram(method).observe(time.perf_counter() - started)


def volume_request(volume: str, method: str) -> None:
    """One request sent to a volume (the hook mkv.volumes.pool.Pool calls)."""
    _volume_requests(volume, method).inc()


def volume_error(volume: str, kind: str) -> None:
    VOLUME_ERRORS.labels(volume, kind).inc()


# --- read from the index at scrape time --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VolumeSample:
    """What /-/metrics says of one volume. `up` is None while its status is unknown."""

    volume: str
    up: bool | None
    probe_seconds: float | None
    age_seconds: float | None


def volume_samples(volumes: Iterable[str], rows: Mapping[str, HealthRow], now: float,
                   stale_after: float) -> list[VolumeSample]:
    """The service's own view of each configured volume (core.health_status): up or down
    from a fresh row. A volume never published, or whose row is older than `stale_after`
    (the health process is dead or stuck), is unknown: no `up` and no probe latency, only
    the row's age, so an alert on `mkv_volume_up == 0` never fires on a guess and one on
    the age finds a dead health process."""
    status = core.health_status(rows, now, stale_after)
    out = []
    for vol in volumes:
        row = rows.get(vol)
        known = status.get(vol, Health.UNKNOWN) is not Health.UNKNOWN
        latency = row.latency_ms / 1000 if row is not None and row.latency_ms is not None else None
        out.append(VolumeSample(vol, status[vol] is not Health.DOWN if known else None,
                                latency if known else None,
                                max(0.0, now - row.checked) if row is not None else None))
    return out


class IndexCollector:
    """Gauges read from the index when /-/metrics is asked: one read of volume_health and
    of the two small stats tables, never a count over `keys`."""

    def __init__(self, cfg: Config, reader: Reader, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.reader = reader
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        try:
            rows = self.reader.health()
            keys = self.reader.key_stats()
            pending = self.reader.pending_stats()
            queued, failing = self.reader.repair_stats()
        except apsw.Error as exc:  # the request metrics are still worth answering with
            log.warning("metrics: cannot read the index: %s", exc)
            return
        up = GaugeMetricFamily("mkv_volume_up", "1 up, 0 down, as the health process last "
                               "published it; absent while unknown (see the age)",
                               labels=["volume"])
        probe = GaugeMetricFamily("mkv_volume_probe_seconds",
                                  "Latency of the volume's last health probe", labels=["volume"])
        age = GaugeMetricFamily("mkv_volume_health_age_seconds",
                                "Seconds since the health process last published the volume's "
                                "status", labels=["volume"])
        stale = core.stale_after(self.cfg.health_interval, self.cfg.health_timeout)
        for s in volume_samples(self.cfg.volumes, rows, self.clock(), stale):
            if s.up is not None:
                up.add_metric([s.volume], 1.0 if s.up else 0.0)
            if s.probe_seconds is not None:
                probe.add_metric([s.volume], s.probe_seconds)
            if s.age_seconds is not None:
                age.add_metric([s.volume], s.age_seconds)
        replaced = GaugeMetricFamily("mkv_volume_replaced",
                                     "1 while the volume's disk is not the one the index knows "
                                     "(reads avoid it, its keys are repaired), else 0; absent "
                                     "while unknown", labels=["volume"])
        for s in volume_samples(self.cfg.volumes, rows, self.clock(), stale):
            if s.up is not None:
                replaced.add_metric([s.volume], 1.0 if rows[s.volume].replaced else 0.0)
        yield from (up, probe, age, replaced)
        queue = GaugeMetricFamily("mkv_repair_queue", "Copies queued for repair (docs/design.md, "
                                  "\"Self-healing\"), by whether a repair of them failed already",
                                  labels=["state"])
        queue.add_metric(["waiting"], queued - failing)
        queue.add_metric(["retrying"], failing)
        yield queue
        count = GaugeMetricFamily("mkv_stored_keys", "Keys in the index, by state",
                                  labels=["state"])
        size = GaugeMetricFamily("mkv_stored_bytes", "Value bytes of the keys in the index "
                                 "(one copy), by state", labels=["state"])
        for state, (n, total) in sorted(keys.items()):
            count.add_metric([state.name.lower()], n)
            size.add_metric([state.name.lower()], total)
        yield from (count, size)
        ops = GaugeMetricFamily("mkv_pending_operations", "Pending operations on copies, by op "
                                "(remove, mark_unlinked) and state (intent, due, orphaned)",
                                labels=["op", "state"])
        for (op, state), n in sorted(pending.items()):
            ops.add_metric([op.name.lower(), state.name.lower()], n)
        yield ops


class _InProcess:
    """The default registry, for a process outside `mkv serve`."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def render(index: IndexCollector | None = None) -> tuple[bytes, str]:
    """The exposition text for /-/metrics and its content type: every process's values
    (or this process's), then what the index says."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_InProcess())
    if index is not None:
        registry.register(index)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges (counters and histograms stay summed)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
