"""Healing manual drift as it happens: a host's own event -> a look at that one service -> its job, with a
flap guard.

A runtime's event (``hostwatch``) only says "look at this service on this host again". What happens next is
decided by the planner on fresh facts (``Engine.heal_check``: that host observed again, that service planned
with the rules of every reconcile, its job launched through the same code), never by the event itself, so:

- an event caused by a job of ours is ignored while that job is in flight (the job queue knows: a deploy
  stopping the old release, a switch, a prune, retention), and one arriving after it ended finds the service in
  sync, so no job; no timing guess is involved anywhere;
- a burst of events (a unit's every sub-state, a container's die, stop and destroy) is one look: one per
  service at a time, and one more after it when an event came while it looked.

The flap guard: a service whose instance keeps dying after heals (each death within ``STABLE_S`` of the heal
before it) is healed again at once the first time, then only after a doubling wait (``backoff.Backoff``, 10 s to
5 min), so a crash-looping release never makes the daemon hammer its host. The wait is shown where users look:
the service's status (``healing``, and a reason) and the reasons of the heal job that follows it. A service that
stayed up ``STABLE_S`` is forgotten. The periodic resync holds back as well (``holding``), unless git changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from deployerd.backoff import Backoff
from deployerd.runtimes.base import Drift

log = logging.getLogger(__name__)

FLAP_MIN_S, FLAP_MAX_S = 10.0, 300.0
STABLE_S = 120.0  # a healed service that stayed up this long is not flapping any more

# (host, services to look at (None: every service on the host), reasons) -> the services a heal job started for
Check = Callable[[str, set[str] | None, list[str]], Awaitable[set[str]]]


@dataclass
class Flap:
    """A service healed after dying: how often in a row, when last, and when the next heal may run."""

    heals: int = 0
    last_heal: float = 0.0  # monotonic
    backoff: Backoff = field(default_factory=lambda: Backoff(FLAP_MIN_S, FLAP_MAX_S))

    def note(self, now: float | None = None) -> str | None:
        """What the status says about it (None: it is healed at once next time)."""
        wait = self.backoff.remaining_s(now)
        if self.heals < 2 and wait <= 0:
            return None
        due = datetime.fromtimestamp(time.time() + wait, UTC).strftime("%H:%M:%S UTC")
        return (f"flapping: healed {self.heals} times in a row, each death within {STABLE_S:g} s of a heal; "
                + (f"its next heal waits until {due}" if wait > 0 else "its next heal is due")
                + f" (backoff doubling to {FLAP_MAX_S:g} s)")


class Healer:
    def __init__(self, check: Check, busy: Callable[[str], bool],
                 on_note: Callable[[str, str | None], None] | None = None) -> None:
        self._check = check
        self._busy = busy  # a job for this service is in flight
        self._on_note = on_note  # a service's flap note changed (status shows it)
        self._looking: dict[tuple[str, str | None], asyncio.Task[None]] = {}
        self._again: dict[tuple[str, str | None], list[str]] = {}  # events that came while it looked
        self.flaps: dict[str, Flap] = {}
        self.heals = 0  # heal jobs launched from events (metrics, tests)
        # the last events and what came of them: (host, service, what, outcome), for the log, /health and tests
        self.recent: deque[tuple[str, str | None, str, str]] = deque(maxlen=200)

    def drift(self, host: str, drift: Drift) -> None:
        """A runtime reported ``drift`` on ``host``: look at the service (every one, for a watch that (re)started)."""
        if drift.service is not None and self._busy(drift.service):
            self._record(host, drift.service, [drift.what], "ignored: a job of ours is in flight")
            return  # a job of ours is at work on it; the reconcile its end starts sees the end state
        key = (host, drift.service)
        if key in self._looking:
            self._again.setdefault(key, []).append(drift.what)
            return
        self._looking[key] = asyncio.create_task(self._look(key, [drift.what]), name=f"heal {host} {drift.service}")

    def holding(self, service: str, now: float | None = None) -> bool:
        """Is the flap guard holding ``service`` back (its next heal is not due)?"""
        flap = self._current(service, now)
        return flap is not None and flap.backoff.waiting(now)

    def note(self, service: str) -> str | None:
        flap = self._current(service)
        return flap.note() if flap is not None else None

    def notes(self) -> dict[str, str]:
        return {s: n for s in list(self.flaps) if (n := self.note(s)) is not None}

    async def close(self) -> None:
        tasks = list(self._looking.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _current(self, service: str, now: float | None = None) -> Flap | None:
        """The service's flap record, forgotten once it stayed up ``STABLE_S`` after its last heal."""
        flap = self.flaps.get(service)
        now = time.monotonic() if now is None else now
        if flap is not None and now - flap.last_heal > STABLE_S and not flap.backoff.waiting(now):
            del self.flaps[service]
            self._noted(service)
            return None
        return flap

    async def _look(self, key: tuple[str, str | None], reasons: list[str]) -> None:
        host, service = key
        try:
            while True:
                flap = self._current(service) if service is not None else None
                if service is not None and flap is not None and (wait := flap.backoff.remaining_s()) > 0:
                    self._noted(service)
                    await asyncio.sleep(wait)
                    reasons = reasons + [f"flap guard: waited {wait:.0f} s before heal {flap.heals + 1} "
                                         f"(healed {flap.heals} times, each within {STABLE_S:g} s of the last)"]
                try:
                    healed = await self._check(host, None if service is None else {service}, reasons)
                except Exception as e:  # a look that failed (host lost meanwhile): the resync looks again
                    log.warning("heal check of %s on %s failed: %s", service or "every service", host, e)
                    healed = set()
                for name in healed:
                    self._healed(name)
                self._record(host, service, reasons, f"healed: {', '.join(sorted(healed))}" if healed else
                             "looked again: nothing to heal")
                more = self._again.pop(key, None)
                if not more:
                    return
                reasons = more
        finally:
            self._looking.pop(key, None)
            self._again.pop(key, None)

    def _record(self, host: str, service: str | None, reasons: list[str], outcome: str) -> None:
        self.recent.append((host, service, "; ".join(reasons), outcome))
        log.debug("host %s event for %s (%s): %s", host, service or "every service", "; ".join(reasons), outcome)

    def _healed(self, service: str) -> None:
        """A heal job started for ``service``: count it; from the second in a row on, the next one waits."""
        self.heals += 1
        now = time.monotonic()
        flap = self._current(service, now)
        if flap is None:
            flap = self.flaps[service] = Flap()
        elif flap.heals >= 1:
            flap.backoff.fail()
        flap.heals += 1
        flap.last_heal = now
        self._noted(service)

    def _noted(self, service: str) -> None:
        if self._on_note is not None:
            self._on_note(service, self.note(service) if service in self.flaps else None)
