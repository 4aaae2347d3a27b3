"""Doubling backoff after consecutive failures: one rule for a failing service's jobs and a down host's probes.

The first failure waits ``min_s``, each further one twice as long, capped at ``max_s``; a success forgets it
(the owner drops the value). Times are monotonic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Backoff:
    min_s: float
    max_s: float
    failures: int = 0
    until: float = 0.0  # monotonic: no new attempt before this

    def fail(self) -> float:
        """Count one more failure; returns the wait before the next attempt."""
        self.failures += 1
        wait: float = min(self.max_s, self.min_s * 2.0 ** (self.failures - 1))
        self.until = time.monotonic() + wait
        return wait

    def waiting(self, now: float | None = None) -> bool:
        """Whether the next attempt is not due yet."""
        return self.until > (time.monotonic() if now is None else now)

    def remaining_s(self, now: float | None = None) -> float:
        """Seconds until the next attempt is due (0 when it is)."""
        return max(0.0, self.until - (time.monotonic() if now is None else now))
