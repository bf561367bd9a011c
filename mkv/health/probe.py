"""Pure probe decisions: folding probe results into a volume's up/down state with
hysteresis, so one slow answer does not flap a volume."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ProbeState:
    up: bool
    since: float
    fails: int = 0
    oks: int = 0
    latency_ms: float | None = None
    error: str | None = None


def observe(prev: ProbeState | None, ok: bool, now: float, fail_count: int, ok_count: int,
            latency_ms: float | None = None, error: str | None = None) -> ProbeState:
    """Fold one probe result into a volume's state.

    A volume never seen is presumed up (like "unknown"), so a fresh service
    does not refuse writes until the first probes are in.
    """
    if prev is None:
        prev = ProbeState(up=True, since=now)
    fails = 0 if ok else prev.fails + 1
    oks = prev.oks + 1 if ok else 0
    up = prev.up
    if up and fails >= fail_count:
        up = False
    elif not up and oks >= ok_count:
        up = True
    since = prev.since if up == prev.up else now
    return ProbeState(up, since, fails, oks, latency_ms if ok else prev.latency_ms,
                      None if ok else error)
