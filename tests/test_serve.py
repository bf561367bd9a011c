"""`mkv serve` and plain gunicorn run the same service, start the writer, and stop cleanly."""

import os
import signal
import subprocess
import sys
import time

import requests

from mkv import identity
from tests.cluster import free_port, group_alive, wait_http
from tests.helpers import roundtrip


def test_serve_runs_writer_and_stops_the_whole_tree(service):
    roundtrip(service.url, "/serve")
    writers = service.pids("mkv.writer")
    assert len(writers) == 1
    # The service answers as soon as one worker is up; the second may still be booting.
    deadline = time.monotonic() + 20
    while len(service.pids("mkv serve")) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(service.pids("mkv serve")) >= 3  # master + 2 workers
    pgid = service.proc.pid
    assert service.stop() == 0
    assert not group_alive(pgid)
    assert not os.path.exists(service.db + ".writer.sock")


def test_plain_gunicorn_with_our_config_is_the_same_service(volumes, tmp_path):
    port = free_port()
    env = {**os.environ,
           "MKV_VOLUMES": ",".join(v.address for v in volumes), "MKV_DB": str(tmp_path / "i.db"),
           "MKV_PORT": str(port), "MKV_WORKERS": "2"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = (tmp_path / "gunicorn.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:mkv.service.gunicorn_conf",
                             "mkv.service.wsgi:app"], env=env, stdout=log, stderr=log,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/-/health", timeout=20)
        roundtrip(url, "/plain")
        health = requests.get(url + "/-/health").json()
        assert health["writer"]["up"] is True
        assert {v["volume"] for v in health["volumes"]} == {v.address for v in volumes}
        # the metrics directory beside the index, shared with the writer
        assert list((tmp_path / "i.db.metrics").glob("counter_*.db"))
        metrics = requests.get(url + "/-/metrics").text
        assert 'mkv_requests_total{method="PUT",status="201"} 1.0' in metrics
        assert "mkv_writer_commits_total" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        deadline = time.monotonic() + 5
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_alive(proc.pid), "the writer outlived gunicorn"
        assert not (tmp_path / "i.db.metrics").exists()


def test_mkv_volume_command_serves_and_stops_on_sigterm(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mkv", "volume", "--root", str(tmp_path / "v"),
                             "--port", str(port)], start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ping")
        assert requests.put(f"http://127.0.0.1:{port}/ab/cd/x", data=b"1").status_code == 201
        assert (tmp_path / "v" / "ab" / "cd" / "x").read_bytes() == b"1"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_mkv_volume_marks_its_disk_once_and_serves_the_marker(tmp_path):
    """docs/design.md, "Self-healing": the marker is made before nginx starts, kept on
    the next start, and served like any file under the root."""
    ids = []
    for _ in range(2):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "mkv", "volume", "--root",
                                 str(tmp_path / "v"), "--port", str(port)], start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/-/ping")
            r = requests.get(f"http://127.0.0.1:{port}/{identity.MARKER}", timeout=10)
            assert r.status_code == 200
            ids.append(identity.parse_marker(r.content))
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
    assert ids[0] == ids[1]
    assert identity.parse_marker((tmp_path / "v" / identity.MARKER).read_bytes()) == ids[0]


def test_mkv_without_command_or_with_unknown_one_exits_2():
    assert subprocess.run([sys.executable, "-m", "mkv"], capture_output=True).returncode == 2
    r = subprocess.run([sys.executable, "-m", "mkv", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_bin_launchers_run_the_commands_from_the_checkout():
    r = subprocess.run(["bin/mkv", "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "serve" in r.stdout and "volume" in r.stdout
    for tool in ("bin/mkv-rebuild", "bin/mkv-rebalance", "bin/mkv-scrub"):
        r = subprocess.run([tool, "--help"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "--volumes" in r.stdout, tool
        assert subprocess.run([tool, "--no-such-flag"], capture_output=True,
                              timeout=30).returncode == 2


def test_ctrl_c_to_the_whole_group_stops_cleanly_without_restarts(volumes, make_service):
    svc = make_service(volumes)
    roundtrip(svc.url, "/ctrl-c")
    # every worker past its boot: a SIGINT that lands before gunicorn has installed a
    # worker's signal handlers is gunicorn's own race, not what this test is about
    time.sleep(1.0)
    pgid = svc.proc.pid
    os.killpg(pgid, signal.SIGINT)  # what a terminal does on Ctrl-C
    svc.proc.wait(20)
    deadline = time.monotonic() + 10
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_alive(pgid)
    assert "restarting" not in svc.output()


def test_writer_and_health_stop_when_the_master_is_killed(volumes, make_service):
    svc = make_service(volumes)
    children = svc.pids("mkv.writer") + svc.pids("mkv.health") + svc.pids("mkv.repair")
    assert len(children) == 3
    os.kill(svc.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10

    def alive(pid: int) -> bool:
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in "ZX"
        except OSError:
            return False

    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in children), "orphaned writer, health or repair process"
