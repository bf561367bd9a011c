"""/-/metrics of a real `mkv serve`: values summed over every worker and the writer, the
index's counts, the volumes' health, and the metrics directory beside the index."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from mkv.model import HealthRow
from mkv.service.metrics import volume_samples
from tests.helpers import FAST_HEALTH, TIMEOUT, wait_until
from tests.service import MkvService

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(svc: MkvService) -> Samples:
    r = requests.get(svc.url + "/-/metrics", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def only(samples: Samples, name: str, drop: tuple[str, ...] = ()) -> dict[tuple, float]:
    """The samples of one name, by their labels (without the `drop` ones), zeros left out."""
    out: dict[tuple, float] = {}
    for (n, labels), value in samples.items():
        if n == name and value:
            key = tuple(v for k, v in labels if k not in drop)
            out[key] = out.get(key, 0.0) + value
    return out


def worker_pids(svc: MkvService) -> list[int]:
    return [p for p in svc.pids("mkv serve") if p != svc.proc.pid]


def value_files(svc: MkvService) -> set[str]:
    return {p.name for p in Path(svc.db + ".metrics").glob("*.db")}


def pids_with_counters(svc: MkvService) -> set[int]:
    return {int(name[len("counter_"):-3]) for name in value_files(svc) if name.startswith("counter_")}


def test_metrics_sum_every_worker_and_the_writer(volumes, make_service):
    svc = make_service(volumes, workers=3)
    wait_until(lambda: len(worker_pids(svc)) == 3, 30, "three workers")
    base = svc.url
    sizes = {f"/m/{i}": 100 + i * 37 for i in range(12)}

    def call(method: str, key: str, data: bytes | None = None) -> int:
        # a connection per request (no session): the workers take turns accepting them
        return requests.request(method, base + key, data=data, allow_redirects=False,
                                timeout=TIMEOUT).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda k: call("PUT", k, b"v" * sizes[k]), sizes)) == {201}
        assert call("PUT", "/m/0", b"again") == 403
        gets = [f"/m/{i % 12}" for i in range(20)]
        assert set(pool.map(lambda k: call("GET", k), gets)) == {302}
        assert set(pool.map(lambda k: call("GET", k), [f"/none/{i}" for i in range(5)])) == {404}
        assert set(pool.map(lambda k: call("HEAD", k), ["/m/1", "/m/2", "/m/3"])) == {302}
        assert set(pool.map(lambda k: call("DELETE", k), ["/m/9", "/m/10", "/m/11"])) == {204}
        assert call("DELETE", "/m/9") == 404
        assert set(pool.map(lambda k: call("UNLINK", k), ["/m/7", "/m/8"])) == {204}
        assert call("GET", "/m/?list") == 200

    # a write in flight holds its key's lock: a second PUT of the key is refused (409)
    slow = socket.create_connection(("127.0.0.1", svc.port))
    slow.sendall(b"PUT /m/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"s" * 500)
    wait_until(lambda: requests.get(base + "/-/health", timeout=TIMEOUT).json()["writer"]["locks"] == 1,
               10, "the slow PUT to hold its lock")
    assert call("PUT", "/m/slow", b"other") == 409
    slow.sendall(b"s" * 500)
    slow.settimeout(TIMEOUT)
    assert slow.recv(100).startswith(b"HTTP/1.1 201")
    slow.close()
    sizes["/m/slow"] = 1000

    m = scrape(svc)
    assert only(m, "mkv_requests_total") == {
        ("PUT", "201"): 13, ("PUT", "403"): 1, ("PUT", "409"): 1, ("GET", "302"): 20,
        ("GET", "404"): 5, ("GET", "200"): 1, ("HEAD", "302"): 3, ("DELETE", "204"): 3,
        ("DELETE", "404"): 1, ("UNLINK", "204"): 2}
    assert only(m, "mkv_request_seconds_count") == {
        ("PUT",): 15, ("GET",): 26, ("HEAD",): 3, ("DELETE",): 4, ("UNLINK",): 2}
    assert only(m, "mkv_request_seconds_bucket", drop=("le",)) != {}  # buckets per method
    assert m[("mkv_request_seconds_bucket", (("le", "+Inf"), ("method", "GET")))] == 26
    assert m[("mkv_put_bytes_total", ())] == sum(sizes.values())

    live = [k for k in sizes if k not in ("/m/7", "/m/8", "/m/9", "/m/10", "/m/11")]
    assert only(m, "mkv_stored_keys") == {("live",): len(live), ("unlinked",): 2}
    assert only(m, "mkv_stored_bytes") == {("live",): sum(sizes[k] for k in live),
                                           ("unlinked",): sizes["/m/7"] + sizes["/m/8"]}
    assert m[("mkv_stored_keys", (("state", "deleting"),))] == 0
    # every copy was written and removed while its volume was up: nothing left to do
    assert only(m, "mkv_pending_operations") == {}

    # each PUT: blob + sidecar to 3 volumes; each UNLINK: a sidecar to 3; each DELETE:
    # sidecar + blob removed from 3
    assert only(m, "mkv_volume_requests_total", drop=("volume",)) == {("PUT",): 13 * 6 + 2 * 3,
                                                                      ("DELETE",): 3 * 6}
    assert set(only(m, "mkv_volume_requests_total", drop=("method",))) == {
        (v.address,) for v in volumes}
    assert only(m, "mkv_volume_errors_total") == {}

    commits = m[("mkv_writer_commits_total", ())]
    assert commits > 0
    assert m[("mkv_writer_batch_requests_count", ())] == commits
    assert m[("mkv_writer_commit_seconds_count", ())] == commits
    # at least a lock and a put per PUT went through the writer's batches
    assert m[("mkv_writer_batch_requests_sum", ())] >= 2 * 13
    assert m[("mkv_writer_lock_conflicts_total", ())] == 1
    health = requests.get(base + "/-/health", timeout=TIMEOUT).json()
    assert health["writer"]["commits"] == commits

    # several workers answered, and the writer counted in the same directory
    workers = set(worker_pids(svc))
    assert len(pids_with_counters(svc) & workers) >= 2
    assert set(svc.pids("mkv.writer")) <= pids_with_counters(svc)
    # any worker's answer is the same sum
    again = [scrape(svc) for _ in range(6)]
    assert all(only(s, "mkv_requests_total") == only(m, "mkv_requests_total") for s in again)


def test_a_killed_volume_is_down_in_the_metrics(make_volumes, make_service):
    vols = make_volumes(3)
    svc = make_service(vols, extra=FAST_HEALTH)
    victim = vols[1].address

    def up() -> dict[tuple, float]:
        return {labels: value for (name, labels), value in scrape(svc).items()
                if name == "mkv_volume_up"}

    wait_until(lambda: up() == {(("volume", v.address),): 1.0 for v in vols}, 10, "all volumes up")
    m = scrape(svc)
    for v in vols:
        assert m[("mkv_volume_probe_seconds", (("volume", v.address),))] > 0
        assert 0 <= m[("mkv_volume_health_age_seconds", (("volume", v.address),))] < 10
    vols[1].stop()
    wait_until(lambda: up().get((("volume", victim),)) == 0.0, 10, "the stopped volume down")
    assert {k: v for k, v in up().items() if k != (("volume", victim),)} == {
        (("volume", v.address),): 1.0 for v in vols if v.address != victim}


def test_volume_samples_leave_unknown_volumes_without_a_status():
    rows = {"a:1": HealthRow("a:1", True, 100.0, 1.0, 2.0, None),
            "b:2": HealthRow("b:2", False, 100.0, 1.0, None, "refused"),
            "c:3": HealthRow("c:3", False, 10.0, 1.0, 3.0, "refused")}  # stale
    got = volume_samples(["a:1", "b:2", "c:3", "d:4"], rows, now=101.0, stale_after=5.0)
    assert [(s.volume, s.up, s.probe_seconds, s.age_seconds) for s in got] == [
        ("a:1", True, 0.002, 1.0), ("b:2", False, None, 1.0), ("c:3", None, None, 91.0),
        ("d:4", None, None, None)]


# --- the metrics directory, <db>.metrics ----------------------------------------------------------


def test_a_killed_masters_metrics_are_cleaned_at_the_next_start(volumes, make_service, tmp_path):
    db = str(tmp_path / "index.db")
    first = make_service(volumes, db=db)
    for i in range(5):
        assert requests.put(f"{first.url}/k/{i}", data=b"v", timeout=TIMEOUT).status_code == 201
    assert only(scrape(first), "mkv_requests_total") == {("PUT", "201"): 5}
    os.kill(first.proc.pid, signal.SIGKILL)
    first.kill()  # the rest of its process group; waits for its writer to let go
    stale = value_files(first)
    assert stale, "a SIGKILLed master leaves its values"

    second = make_service(volumes, db=db)
    new_pids = set(second.pids("mkv serve") + second.pids("mkv.writer"))
    left = {name for name in stale & value_files(second)
            if int(name.rsplit("_", 1)[1][:-3]) not in new_pids}
    assert left == set()
    assert requests.put(f"{second.url}/k/new", data=b"v", timeout=TIMEOUT).status_code == 201
    assert only(scrape(second), "mkv_requests_total") == {("PUT", "201"): 1}
    assert only(scrape(second), "mkv_stored_keys") == {("live",): 6}  # the index keeps its count
    assert second.stop() == 0
    assert not os.path.exists(db + ".metrics"), "a clean stop takes the directory with it"


def test_a_second_service_on_a_used_index_is_refused_and_leaves_the_directory_alone(
        volumes, make_service, tmp_path):
    db = str(tmp_path / "index.db")
    first = make_service(volumes, db=db)
    assert requests.put(first.url + "/busy", data=b"v", timeout=TIMEOUT).status_code == 201
    before = value_files(first)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    second = subprocess.run(
        [sys.executable, "-m", "mkv", "serve", "--volumes", ",".join(v.address for v in volumes),
         "--db", db, "--port", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert "a writer is running on" in second.stderr and db + ".metrics" in second.stderr
    assert before <= value_files(first)
    assert only(scrape(first), "mkv_requests_total") == {("PUT", "201"): 1}


def test_the_directory_is_set_before_prometheus_client_is_imported(tmp_path):
    """The entry points' order matters; getting it wrong is a clear error, not metrics
    that silently stay in one process."""
    db = str(tmp_path / "i.db")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    made = subprocess.run([sys.executable, "-c", "import os, sys, mkv.service.metricsdir as m; "
                           f"print(m.share_between_workers({db!r})); "
                           "print('prometheus_client' in sys.modules)"],
                          env=env, capture_output=True, text=True, check=True).stdout.split()
    assert made == [db + ".metrics", "False"]
    assert not os.path.exists(db + ".metrics")  # the process that made it took it along
    late = subprocess.run([sys.executable, "-c", "import prometheus_client, "
                           "mkv.service.metricsdir as m; m.share_between_workers('x.db')"],
                          env=env, capture_output=True, text=True, cwd=tmp_path)
    assert late.returncode == 1 and "ImportedTooEarly" in late.stderr
    assert not (tmp_path / "x.db.metrics").exists()
