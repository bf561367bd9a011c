"""Hysteresis of volume health, the supervisor, and the health process's clean-up work
against a volume that never answers."""

import sys
import time

import pytest

from mkv.health.checker import HealthChecker
from mkv.health.probe import ProbeState, observe
from mkv.index import schema
from mkv.index.reader import Reader
from mkv.model import Pending, PendingOp, PendingState
from mkv.service.supervise import Child, Supervisor
from mkv.writer.server import serve_in_thread


def run(results, fail=2, ok=2, start=None):
    state, t = start, 0.0
    out = []
    for r in results:
        t += 1
        state = observe(state, r, t, fail, ok, latency_ms=1.0, error=None if r else "boom")
        out.append(state)
    return out


def test_unknown_volume_starts_up_and_goes_down_after_k_failures():
    states = run([False, False, False])
    assert [s.up for s in states] == [True, False, False]
    assert states[1].since == 2.0 and states[2].since == 2.0
    assert states[2].error == "boom"


def test_one_failure_does_not_flap():
    assert all(s.up for s in run([True, False, True, False, True]))


def test_comes_back_after_m_successes():
    states = run([False, False, True, False, True, True, True], fail=2, ok=2)
    assert [s.up for s in states] == [True, False, False, False, False, True, True]
    assert states[5].since == 6.0 and states[5].error is None


def test_fail_count_one_means_immediately():
    assert not run([False], fail=1)[0].up


def test_down_volume_keeps_last_latency_and_counts():
    s = observe(ProbeState(True, 0.0, latency_ms=3.0), False, 1.0, 2, 2, error="x")
    assert s.latency_ms == 3.0 and s.fails == 1 and s.oks == 0


def test_supervisor_restarts_a_killed_child(tmp_path):
    child = Child("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    sup = Supervisor([child], poll=0.05)
    sup.start()
    try:
        first = child.proc.pid
        child.proc.kill()
        deadline = time.monotonic() + 5
        while (child.proc.pid == first or not child.alive()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.alive() and child.proc.pid != first and child.restarts == 1
    finally:
        sup.stop()
    assert not child.alive()


def test_supervisor_start_fails_loudly_when_a_child_is_never_ready():
    def never():
        raise TimeoutError("not ready")

    child = Child("broken", [sys.executable, "-c", "import time; time.sleep(60)"], ready=never)
    with pytest.raises(TimeoutError):
        Supervisor([child]).start()
    child.proc.wait(5)  # the half-started child was killed, not left behind
    assert child.proc.returncode is not None


def test_a_volume_that_fails_clean_up_work_counts_as_a_failed_probe_once(silent_volume, tmp_path):
    """Three removals are due on a volume that accepts and never answers: the first one
    times out, counts as a failed probe, and the other two are left for a later round
    instead of each costing another timeout while the probes wait."""
    db, sock = str(tmp_path / "i.db"), str(tmp_path / "w.sock")
    server, thread = serve_in_thread(db, sock)
    try:
        conn = schema.open_index(db)
        with conn:
            schema.write_pending(conn, [Pending(f"/due/{i}", silent_volume.address, PendingOp.REMOVE,
                                                PendingState.DUE, 1.0, "a1") for i in range(3)])
        checker = HealthChecker(db, [silent_volume.address], interval=1.0, timeout=0.3,
                                fail_count=2, ok_count=2, writer_socket=sock)
        checker.record(silent_volume.address, True, 1.0, None)  # it answered a probe once
        assert checker.finish_pending() == 0
        state = checker.states[silent_volume.address]
        assert state.fails == 1 and "clean-up" in state.error
        assert len(Reader(conn).due_pending(0.0, [silent_volume.address])) == 3  # kept
    finally:
        server.stop()
        thread.join(10)
