"""The list requests' token bucket: the pure refill rule, and one bucket shared by processes."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from mkv.service.ratelimit import ListLimiter, take


def test_a_new_bucket_starts_full_and_empties() -> None:
    tokens, at = 0.0, 0.0
    waits = []
    for _ in range(4):
        tokens, at, wait = take(tokens, at, 100.0, rate=1.0, burst=3)
        waits.append(wait)
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] == 1.0  # the next token is one second away


def test_the_wait_is_when_the_next_token_is_there() -> None:
    tokens, at, wait = take(0.25, 10.0, 10.0, rate=2.0, burst=5)
    assert wait == (1 - 0.25) / 2.0
    tokens, at, wait = take(tokens, at, 10.0 + wait, rate=2.0, burst=5)
    assert wait == 0.0


@given(st.floats(0.1, 100), st.integers(1, 50),
       st.lists(st.floats(0, 0.5), min_size=1, max_size=300))
def test_never_more_than_burst_plus_rate_times_elapsed(rate: float, burst: int,
                                                       gaps: list[float]) -> None:
    tokens, at, now, granted = 0.0, 0.0, 1000.0, 0
    for gap in gaps:
        now += gap
        tokens, at, wait = take(tokens, at, now, rate, burst)
        granted += wait == 0
        assert 0 <= tokens <= burst
    assert granted <= burst + rate * (now - 1000.0) + 1e-6


def test_processes_share_one_bucket() -> None:
    """Four forked processes drain one bucket of 20: 20 requests get through in all
    (rate so low that no token comes back meanwhile), not 20 each."""
    limiter = ListLimiter(rate=0.001, burst=20)
    pids, reads = [], []
    for _ in range(4):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(r)
            got = sum(limiter.wait() == 0 for _ in range(15))
            os.write(w, str(got).encode())
            os._exit(0)
        os.close(w)
        pids.append(pid)
        reads.append(r)
    counts = []
    for pid, r in zip(pids, reads, strict=True):
        os.waitpid(pid, 0)
        counts.append(int(os.read(r, 16)))
        os.close(r)
    assert sum(counts) == 20
    assert limiter.wait() > 0  # the parent sees the same empty bucket


def test_rate_0_never_waits() -> None:
    limiter = ListLimiter(rate=0, burst=1)
    assert all(limiter.wait() == 0 for _ in range(100))
