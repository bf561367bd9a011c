"""Shared pytest fixtures. Each group below belongs to one area; add new ones under a heading.

Two kinds of processes: per test (`volumes`, `service`, and the `make_*` factories), for tests
that kill, stop or reconfigure what they run; and per module (`shared_*`), one cluster that a
module's tests share, each test using its own keys. Helpers that talk to them are in
tests/helpers.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import pytest

from mkv import config
from tests.cluster import NginxVolume
from tests.helpers import FakeVolume, SilentVolume
from tests.service import FileService, MkvService


class HasAddress(Protocol):
    @property
    def address(self) -> str: ...


#: What the service factories take as volumes: running volumes (real or stand-ins) or addresses.
VolumeLike = HasAddress | str


def addresses(volumes: Iterable[VolumeLike]) -> list[str]:
    return [v if isinstance(v, str) else v.address for v in volumes]


def start_volumes(base: Path, n: int, first: int = 1, **kw: object) -> list[NginxVolume]:
    """n volumes under base/vol<first>... (`kw`: NginxVolume.start's writers, secret),
    stopping the ones already started if one fails."""
    started: list[NginxVolume] = []
    try:
        for i in range(first, first + n):
            started.append(NginxVolume.start(base / f"vol{i}", **kw))
    except BaseException:
        for volume in started:
            volume.stop()
        raise
    return started


def stop_services(services: list[MkvService]) -> None:
    """Stopped in parallel: each waits for gunicorn's graceful shutdown."""
    with ThreadPoolExecutor(max_workers=max(1, len(services))) as pool:
        list(pool.map(MkvService.stop, services))


# --- the configuration (mkv/config.py), for the whole run -------------------------------------


@pytest.fixture(scope="session", autouse=True)
def no_machine_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The machine's /etc/mkv/mkv.conf never reaches a test: DEFAULT_CONFIG points at a file
    that does not exist in this process, and the empty MKV_CONFIG every command started by a
    test inherits means "no config file" (a test that needs one names it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "DEFAULT_CONFIG",
                   str(tmp_path_factory.mktemp("etc") / "no-such-mkv.conf"))
        mp.setenv("MKV_CONFIG", "")
        yield


# --- nginx volumes (tests/cluster.py), per test -------------------------------------------------


@pytest.fixture
def make_volumes(tmp_path: Path) -> Iterator[Callable[[int], list[NginxVolume]]]:
    """Factory: make_volumes(n) starts n more volumes; all are stopped when the test ends."""
    started: list[NginxVolume] = []

    def make(n: int) -> list[NginxVolume]:
        batch = start_volumes(tmp_path, n, first=len(started) + 1)
        started.extend(batch)
        return batch

    yield make
    for volume in started:
        volume.stop()


@pytest.fixture
def volumes(make_volumes: Callable[[int], list[NginxVolume]]) -> list[NginxVolume]:
    """Three running volumes under tmp_path, the usual replica count's worth."""
    return make_volumes(3)


# --- the mkv service (tests/service.py), per test -----------------------------------------------


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., MkvService]]:
    """Factory: make_service(volumes, **MkvService kwargs) starts `mkv serve` over the volumes
    (running volumes, stand-ins or addresses); stopped when the test ends. `kind` is the
    MkvService class to start (FileService: every setting in a config file)."""
    started: list[MkvService] = []

    def make(volumes: Iterable[VolumeLike], kind: type[MkvService] = MkvService,
             **kw: object) -> MkvService:
        svc = kind(tmp_path / f"svc{len(started)}", addresses(volumes), **kw)
        started.append(svc)
        return svc.start()

    yield make
    stop_services(started)


@pytest.fixture
def service(volumes: list[NginxVolume], make_service: Callable[..., MkvService]) -> MkvService:
    """`mkv serve` over three volumes with replicas=3."""
    return make_service(volumes)


@pytest.fixture
def file_service(make_service: Callable[..., MkvService]) -> Callable[..., FileService]:
    """Factory: file_service(volumes, **kw) starts `mkv serve --config FILE` with every
    setting in the file (FileService), so a test can change any of them and SIGHUP."""
    return functools.partial(make_service, kind=FileService)


# --- one cluster per module: started once, everything stopped when the module ends --------------


@pytest.fixture(scope="module")
def shared_volumes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NginxVolume]]:
    """Three volumes shared by the module's tests."""
    started = start_volumes(tmp_path_factory.mktemp("shared-volumes"), 3)
    yield started
    for volume in started:
        volume.stop()


@pytest.fixture(scope="module")
def start_shared_service(tmp_path_factory: pytest.TempPathFactory
                         ) -> Iterator[Callable[..., MkvService]]:
    """Factory: start_shared_service(volumes, **MkvService kwargs), for a service with other
    settings that several tests (or parameters) of a module share; stopped at module end."""
    started: list[MkvService] = []

    def start(volumes: Iterable[VolumeLike], **kw: object) -> MkvService:
        svc = MkvService(tmp_path_factory.mktemp("shared-svc"), addresses(volumes), **kw)
        started.append(svc)
        return svc.start()

    yield start
    stop_services(started)


@pytest.fixture(scope="module")
def shared_service(shared_volumes: list[NginxVolume],
                   start_shared_service: Callable[..., MkvService]) -> MkvService:
    """The module's service over `shared_volumes`: replicas=3, default settings."""
    return start_shared_service(shared_volumes, replicas=3)


@pytest.fixture(scope="module")
def fake_volume() -> Iterator[FakeVolume]:
    """A volume whose disk fails every PUT (tests/helpers.py FakeVolume), for the module."""
    fake = FakeVolume()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def failing_service(fake_volume: FakeVolume, shared_volumes: list[NginxVolume],
                    start_shared_service: Callable[..., MkvService]) -> MkvService:
    """Two of the shared volumes and the fake one, replicas=3: the fake is a replica of
    every key."""
    return start_shared_service(shared_volumes[:2] + [fake_volume], replicas=3)


# --- stand-in volumes (tests/helpers.py), per test ----------------------------------------------


@pytest.fixture
def silent_volume() -> Iterator[SilentVolume]:
    """A volume that accepts connections and never answers; closed when the test ends.
    Ask for it before make_service, so the service stops before it closes."""
    silent = SilentVolume()
    yield silent
    silent.close()
