"""Shared pytest fixtures. Each group below belongs to one area; add new ones under a heading."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster import NginxVolume
from tests.service import MkvService

# --- nginx volumes (tests/cluster.py) -------------------------------------------------------


@pytest.fixture
def make_volumes(tmp_path: Path) -> Iterator[Callable[[int], list[NginxVolume]]]:
    """Factory: make_volumes(n) starts n more volumes; all are stopped when the test ends."""
    started: list[NginxVolume] = []

    def make(n: int) -> list[NginxVolume]:
        batch = []
        for _ in range(n):
            root = tmp_path / f"vol{len(started) + 1}"
            volume = NginxVolume.start(root)
            started.append(volume)
            batch.append(volume)
        return batch

    yield make
    for volume in started:
        volume.stop()


@pytest.fixture
def volumes(make_volumes: Callable[[int], list[NginxVolume]]) -> list[NginxVolume]:
    """Three running volumes under tmp_path, the usual replica count's worth."""
    return make_volumes(3)


# --- the mkv service (tests/service.py) -----------------------------------------------------


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., MkvService]]:
    """Factory: make_service(volumes, **kw) starts `mkv serve`; stopped when the test ends."""
    started: list[MkvService] = []

    def make(volumes: list[NginxVolume], **kw: object) -> MkvService:
        svc = MkvService(tmp_path / f"svc{len(started)}", [v.address for v in volumes], **kw)
        started.append(svc)
        return svc.start()

    yield make
    for svc in started:
        svc.stop()


@pytest.fixture
def service(volumes: list[NginxVolume], make_service: Callable[..., MkvService]) -> MkvService:
    """`mkv serve` over three volumes with replicas=3."""
    return make_service(volumes)
