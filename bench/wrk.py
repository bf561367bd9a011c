"""wrk, the load generator for request-rate workloads: installed if missing, one thread.

A Lua `done` hook prints the summary as one JSON line, so nothing depends on wrk's
human-readable output. Non-2xx/3xx answers are counted by wrk as status errors; the
caller says how many of those it expects (all of them, for the 404 workload).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

DONE_HOOK = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""

#: Unique keys per request, for PUT: wrk.format is called for every request.
PUT_SCRIPT = r"""
local n = 0
local body = string.rep("x", tonumber(os.getenv("WRK_BODY_BYTES")))
local prefix = os.getenv("WRK_PREFIX")
request = function()
  n = n + 1
  return wrk.format("PUT", prefix .. n, nil, body)
end
"""


class WrkMissing(RuntimeError):
    """wrk is not installed and could not be installed."""


def ensure_wrk() -> str:
    """Path of wrk, installing Debian's package first if needed (as root, or with sudo)."""
    found = shutil.which("wrk")
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-qq", "wrk"],
                ["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        subprocess.run(sudo + cmd, env=env, check=False)
        found = shutil.which("wrk")
        if found:
            return found
    raise WrkMissing("wrk is not installed and `apt-get install wrk` failed; install it by hand")


@dataclasses.dataclass
class WrkResult:
    requests: int
    seconds: float
    status_errors: int
    socket_errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def summary(self) -> dict:
        return {"requests": self.requests, "seconds": round(self.seconds, 3),
                "rps": round(self.rps, 1), "status_errors": self.status_errors,
                "socket_errors": self.socket_errors, "p50_ms": round(self.p50_ms, 3),
                "p99_ms": round(self.p99_ms, 3)}


def run(url: str, seconds: float, connections: int, script: str = "",
        env: dict[str, str] | None = None) -> WrkResult:
    """One wrk run: 1 thread (the machine is small; the servers need the other cores)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script + DONE_HOOK)
        lua = f.name
    try:
        out = subprocess.run(
            [ensure_wrk(), "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
             "--timeout", "5s", "-s", lua, url],
            capture_output=True, text=True, timeout=seconds + 30,
            env={**os.environ, **(env or {})}, check=True)
    finally:
        Path(lua).unlink()
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON "))
    d = json.loads(line.removeprefix("WRKJSON "))
    return WrkResult(d["requests"], d["duration_us"] / 1e6, d["status"],
                     d["connect"] + d["read"] + d["write"] + d["timeout"],
                     d["p50_us"] / 1e3, d["p99_us"] / 1e3)
