"""SIGHUP on a live service: the configuration file is read again; a valid one reaches the
workers, the health process and the writer with no request failing; an invalid one changes
nothing; settings that cannot change live are refused by name."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests

from tests.cluster import NginxVolume
from tests.helpers import replicas_of, wait_for
from tests.service import FileService, MkvService


class LoadLoop:
    """Threads that PUT a new key and GET it back, over and over, until stopped
    (bounded: at most `seconds`); every answer that is not 201 then 302 is a failure."""

    def __init__(self, svc: MkvService, threads: int = 4, seconds: float = 60.0) -> None:
        self.svc = svc
        self.stopping = threading.Event()
        self.failures: list[str] = []
        self.done = 0
        self.deadline = time.monotonic() + seconds
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, n: int) -> None:
        session = requests.Session()
        i = 0
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            key = f"/load/{n}/{i}"
            i += 1
            try:
                put = session.put(self.svc.url + key, data=b"x" * 100, timeout=10)
                get = session.get(self.svc.url + key, allow_redirects=False, timeout=10)
                if put.status_code != 201 or get.status_code != 302:
                    self.failures.append(f"{key}: PUT {put.status_code} GET {get.status_code}")
            except requests.RequestException as exc:
                self.failures.append(f"{key}: {exc}")
            self.done += 1

    def __enter__(self) -> LoadLoop:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(30)


def test_a_volume_added_by_reload_is_probed_and_written_with_no_request_failing(
        make_volumes: Callable[[int], list[NginxVolume]],
        file_service: Callable[..., FileService]) -> None:
    vols = make_volumes(4)
    svc = file_service(vols[:3], replicas=2)
    assert [v["volume"] for v in svc.health()["volumes"]] == [v.address for v in vols[:3]]
    with LoadLoop(svc) as load:
        wait_for(lambda: load.done >= 40, 30, "the load loop is running")
        svc.write_conf(volumes=",".join(v.address for v in vols))
        hupped = time.monotonic()
        svc.hup()
        wait_for(lambda: vols[3].address in [v["volume"] for v in svc.health()["volumes"]],
                 10, "/-/health lists the new volume")
        listed = time.monotonic() - hupped
        # the health process probes it: up within a few intervals
        wait_for(lambda: {v["volume"]: v["status"] for v in svc.health()["volumes"]}
                 .get(vols[3].address) == "up", 10, "the new volume is up")
        done = load.done
        wait_for(lambda: load.done >= done + 100, 60, "load goes on after the reload")
    assert load.failures == []
    assert listed < 10
    print(f"reload: {load.done} requests across the HUP, none failed; new volume listed "
          f"{listed:.2f} s after the HUP")
    # new PUTs land on it (replicas=2 of 4 volumes: about half the keys)
    for i in range(40):
        assert requests.put(f"{svc.url}/after/{i}", data=b"v", timeout=10).status_code == 201
    assert any(vols[3].address in replicas_of(svc, f"/after/{i}") for i in range(40))
    assert "reloaded the configuration; changed: volumes" in svc.output()


def test_a_broken_file_is_refused_and_the_old_configuration_keeps_serving(
        volumes: list[NginxVolume], file_service: Callable[..., FileService]) -> None:
    svc = file_service(volumes)
    svc.write_conf(replicas="7", health_interval="-1")
    svc.hup()
    wait_for(lambda: "reload refused" in svc.output(), 10, "the refusal is logged")
    out = svc.output()
    assert "replicas: 7 copies need 7 failure domains" in out
    assert "health-interval: must be positive" in out
    assert requests.put(svc.url + "/still", data=b"v", timeout=10).status_code == 201
    assert len(replicas_of(svc, "/still")) == 3
    # a file the parser cannot read at all is refused the same way
    svc.conf.write_text("volumes = [unclosed\n")
    svc.hup()
    wait_for(lambda: svc.output().count("reload refused") >= 3, 10, "the second refusal")
    assert requests.put(svc.url + "/still2", data=b"v", timeout=10).status_code == 201
    assert svc.proc.poll() is None


def test_settings_that_cannot_change_live_are_refused_by_name_and_the_rest_applies(
        volumes: list[NginxVolume], file_service: Callable[..., FileService],
        tmp_path: Path) -> None:
    svc = file_service(volumes, replicas=3)
    svc.write_conf(db=str(tmp_path / "other.db"), replicas="2", synchronous="FULL")
    svc.hup()
    wait_for(lambda: "reloaded the configuration" in svc.output(), 10, "the reload")
    assert "reload: db cannot change while serving" in svc.output()
    wait_for(lambda: svc.health().get("replicas") == 2, 10, "replicas=2 reaches the workers")
    assert requests.put(svc.url + "/two", data=b"v", timeout=10).status_code == 201
    assert len(replicas_of(svc, "/two")) == 2
    assert not (tmp_path / "other.db").exists()
    # the running writer takes the new durability (no restart: its locks stay)
    wait_for(lambda: "synchronous is now FULL" in svc.output(), 10, "the writer's new setting")
    assert "writer exited" not in svc.output()
