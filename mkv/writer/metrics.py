"""The writer's Prometheus values: commits, their size and time, lock conflicts.

The writer is started by the service's master with the master's environment, so in
`mkv serve` it inherits PROMETHEUS_MULTIPROC_DIR and its values land beside the
workers', where /-/metrics sums them (mkv.service.metrics); a restarted writer's
counters add to its predecessor's. Elsewhere (tests, a tool's own writer) they stay in
the process. Only counters and histograms: they need no word from the master when the
writer dies.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

COMMITS = Counter("mkv_writer_commits_total", "Group commits that changed the index")
BATCH = Histogram("mkv_writer_batch_requests",
                  "Requests per group commit (every request of the batch, reads and locks too)",
                  buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
COMMIT_SECONDS = Histogram("mkv_writer_commit_seconds",
                           "Time of one group commit's transaction, BEGIN to COMMIT",
                           buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                    0.05, 0.1, 0.25, 0.5, 1, 2.5))
LOCK_CONFLICTS = Counter("mkv_writer_lock_conflicts_total",
                         "Key locks refused because another connection held them (each a 409 "
                         "or a retry)")


def committed(requests: int, seconds: float) -> None:
    COMMITS.inc()
    BATCH.observe(requests)
    COMMIT_SECONDS.observe(seconds)


def lock_conflict() -> None:
    LOCK_CONFLICTS.inc()
