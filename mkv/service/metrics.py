"""Prometheus metrics, aggregated across gunicorn workers.

prometheus_client's multiprocess mode keeps each process's values in files
under PROMETHEUS_MULTIPROC_DIR; `mkv serve` sets that directory before any
worker starts, and /-/metrics sums the files. Without it (tests, tools) the
default in-process registry is used.
"""

from __future__ import annotations

import functools
import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter("mkv_requests_total", "HTTP requests answered", ["method", "status"])
LATENCY = Histogram(
    "mkv_request_seconds", "Time to answer a write (PUT, DELETE, UNLINK)", ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
)
PUT_BYTES = Counter("mkv_put_bytes_total", "Value bytes accepted by PUT")
VOLUME_ERRORS = Counter("mkv_volume_errors_total", "Failed volume requests", ["volume", "kind"])


#: Methods whose latency is worth a histogram. A GET is a microsecond index lookup;
#: in multiprocess mode each histogram update costs a getpid and two mmap writes.
TIMED = frozenset(("PUT", "DELETE", "UNLINK"))


@functools.cache
def _counter(method: str, status: int):  # noqa: ANN202 - a prometheus child
    return REQUESTS.labels(method, status)


@functools.cache
def _histogram(method: str):  # noqa: ANN202
    return LATENCY.labels(method)


def observe(method: str, status: int, started: float) -> None:
    """Count one answered request (and time it, for writes)."""
    _counter(method, status).inc()
    if method in TIMED:
        _histogram(method).observe(time.perf_counter() - started)


def render() -> tuple[bytes, str]:
    """The exposition text for /-/metrics and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges (counters stay summed)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
