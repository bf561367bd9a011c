"""Bandwidth limiting for mkv-rebalance's copies (--limit-rate)."""

from __future__ import annotations


class RateLimiter:
    """Token bucket over bytes; `delay(n)` says how long to wait before sending n more.

    Pure: the caller passes the clock, so it is tested without sleeping.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1 << 20)
        self.tokens = self.burst
        self.at: float | None = None

    def delay(self, n: int, now: float) -> float:
        if self.rate <= 0:
            return 0.0
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate
