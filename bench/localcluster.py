"""A throwaway local cluster for the failure benchmarks: nginx volumes and `mkv serve`
in a temporary directory, started with the test suite's own launchers and stopped
together."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.cluster import NginxVolume
from tests.service import MkvService


@contextlib.contextmanager
def local_cluster(volumes: int, **service: object) -> Iterator[tuple[list[NginxVolume], MkvService]]:
    tmp = Path(tempfile.mkdtemp(prefix="mkv-bench-"))
    vols = [NginxVolume.start(tmp / f"v{i}") for i in range(volumes)]
    try:
        svc = MkvService(tmp / "svc", [v.address for v in vols], **service).start()
        try:
            yield vols, svc
        finally:
            svc.stop()
    finally:
        for v in vols:
            v.stop()
