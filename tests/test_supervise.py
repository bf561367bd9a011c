"""Supervision of the writer and health processes: the real exit status or signal of a
child that died is logged (under `mkv serve` and plain gunicorn too, whose own reaping
would take it), a child that keeps dying is restarted after growing delays, and the
restarts are counted in mkv_child_restarts_total."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from mkv.service.supervise import (
    MAX_BACKOFF,
    Child,
    Supervisor,
    describe_exit,
    restart_delay,
)
from tests.cluster import free_port, group_alive, wait_http
from tests.helpers import roundtrip
from tests.service import MkvService

#: "<name> <what>; restarting now" or "...; restarting in 0.5 s (...)"
RESTART = re.compile(r"^(\S+) (.*); restarting (now|in ([0-9.]+) s)")


def test_restart_delays_grow_to_the_cap():
    assert [restart_delay(n) for n in range(1, 10)] == [0, 0.5, 1, 2, 4, 8, 16, 30, 30]
    assert restart_delay(100) == MAX_BACKOFF == 30


def test_exits_are_told_with_their_status_or_signal():
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(0) == "exited with status 0"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "was killed by SIGSEGV"
    assert "status unknown" in describe_exit(None)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def restarts_logged(caplog: pytest.LogCaptureFixture, name: str) -> list[tuple[str, float]]:
    """(what happened, delay before the restart) of each death of `name` the log tells."""
    out = []
    for record in caplog.records:
        m = RESTART.match(record.getMessage())
        if m and m.group(1) == name:
            out.append((m.group(2), 0.0 if m.group(3) == "now" else float(m.group(4))))
    return out


@pytest.fixture
def supervised(caplog: pytest.LogCaptureFixture):
    """Factory: a started Supervisor over the given children; stopped at the end."""
    caplog.set_level(logging.INFO, logger="mkv.service.supervise")
    started: list[Supervisor] = []

    def make(*children: Child, **kw) -> Supervisor:
        sup = Supervisor(list(children), poll=0.05, **kw)
        started.append(sup)
        sup.start()
        return sup

    yield make
    for sup in started:
        sup.stop()


def test_a_child_that_exits_at_once_is_restarted_after_growing_delays(supervised, caplog):
    restarted: list[str] = []
    supervised(Child("crasher", [sys.executable, "-c", "import sys; sys.exit(3)"]),
               on_restart=restarted.append)
    wait_for(lambda: len(restarts_logged(caplog, "crasher")) >= 5, 30, "five exits")
    deaths = restarts_logged(caplog, "crasher")[:5]
    assert [delay for _, delay in deaths] == [0, 0.5, 1, 2, 4]
    assert all(what.startswith("(pid ") and "exited with status 3 after" in what
               for what, _ in deaths), deaths
    assert restarted[:4] == ["crasher"] * 4


def test_the_backoff_starts_over_after_a_run_long_enough(supervised, caplog, tmp_path):
    """Runs 1, 2 and 4 exit at once; run 3 lasts past `stable_after`: its death is
    repaired at once, as a first one is."""
    count = tmp_path / "runs"
    script = ("import os, sys, time\n"
              f"p = {str(count)!r}\n"
              "n = int(open(p).read()) if os.path.exists(p) else 0\n"
              "open(p, 'w').write(str(n + 1))\n"
              "if n == 2:\n"
              "    time.sleep(3)\n"
              "sys.exit(10 + n)\n")
    supervised(Child("flaky", [sys.executable, "-c", script]), stable_after=1.5)
    wait_for(lambda: len(restarts_logged(caplog, "flaky")) >= 4, 30, "four exits")
    deaths = restarts_logged(caplog, "flaky")[:4]
    assert [delay for _, delay in deaths] == [0, 0.5, 0, 0.5]
    assert [re.search(r"status (\d+)", what).group(1) for what, _ in deaths] == [
        "10", "11", "12", "13"]


def test_a_killed_child_is_logged_with_its_signal(supervised, caplog):
    child = Child("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    supervised(child)
    first = child.proc.pid
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: restarts_logged(caplog, "sleeper"), 10, "the death to be logged")
    what, delay = restarts_logged(caplog, "sleeper")[0]
    assert what.startswith(f"(pid {first}) was killed by SIGKILL after ") and delay == 0
    wait_for(lambda: child.alive() and child.proc.pid != first, 10, "the restart")


def restart_counts(url: str) -> dict[str, float]:
    text = requests.get(url + "/-/metrics", timeout=5).text
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^mkv_child_restarts_total\{child="(\w+)"\} ([0-9.]+)$', text, re.M)}


def kill_and_see_it_logged(pids: Callable[[], list[int]], output: Callable[[], str]) -> int:
    """SIGKILL the running writer; wait for its successor and for the log line of its death."""
    (writer,) = pids()
    os.kill(writer, signal.SIGKILL)
    wait_for(lambda: [p for p in pids() if p != writer], 20, "a new writer")
    line = f"writer (pid {writer}) was killed by SIGKILL after "
    wait_for(lambda: line in output(), 10, "the writer's death in the log")
    return writer


def test_mkv_serve_logs_a_killed_writers_signal_and_counts_the_restart(volumes, make_service):
    svc: MkvService = make_service(volumes)
    assert restart_counts(svc.url) == {"writer": 0.0, "health": 0.0, "repair": 0.0}
    kill_and_see_it_logged(lambda: svc.pids("mkv.writer"), svc.output)
    assert "restarting now" in svc.output()
    roundtrip(svc.url, "/after-the-writer-died")  # the new writer takes the writes
    wait_for(lambda: restart_counts(svc.url).get("writer") == 1.0, 10, "the restart counted")
    assert restart_counts(svc.url)["health"] == 0.0


def test_plain_gunicorn_logs_a_killed_writers_signal_too(volumes, tmp_path: Path):
    port = free_port()
    env = {**os.environ, "MKV_VOLUMES": ",".join(v.address for v in volumes),
           "MKV_DB": str(tmp_path / "i.db"), "MKV_PORT": str(port), "MKV_WORKERS": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c",
                                 "python:mkv.service.gunicorn_conf", "mkv.service.wsgi:app"],
                                env=env, stdout=out, stderr=out, start_new_session=True)

    def writers() -> list[int]:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes().split(b"\0")
                ppid = int((cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            if ppid == proc.pid and b"mkv.writer" in argv:
                found.append(int(cmdline.parent.name))
        return found

    try:
        wait_http(f"http://127.0.0.1:{port}/-/health", timeout=20)
        kill_and_see_it_logged(writers, lambda: log.read_text(errors="replace"))
        wait_for(lambda: restart_counts(f"http://127.0.0.1:{port}").get("writer") == 1.0, 10,
                 "the restart counted")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        wait_for(lambda: not group_alive(proc.pid), 10, "gunicorn's process group to go")
