"""The repair process's Prometheus counters. Started by the service's master, it inherits
the metrics directory like the writer (mkv.writer.metrics), so /-/metrics sums them; the
queue's length is read from the index (mkv.service.metrics)."""

from __future__ import annotations

from prometheus_client import Counter

REPAIRS = Counter("mkv_repairs_total",
                  "Keys taken from the repair queue, by outcome: repaired (copies made), "
                  "clean (nothing was missing), failed (tried again later)", ["outcome"])
REPAIR_BYTES = Counter("mkv_repair_bytes_total", "Bytes copied by repair and scrub")
SCRUBBED = Counter("mkv_scrub_keys_total",
                   "Keys checked by the background scrub, by outcome: clean, repaired, lost, failed",
                   ["outcome"])


def zero() -> None:
    for outcome in ("repaired", "clean", "failed"):
        REPAIRS.labels(outcome)
    for outcome in ("clean", "repaired", "lost", "failed"):
        SCRUBBED.labels(outcome)
