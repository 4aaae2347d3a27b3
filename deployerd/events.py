"""Typed events of the daemon, and the bus that carries them to subscribers.

The engine, the phase runner and observation publish what happened; metrics, notifications, the audit trail
and the status page subscribe. A publisher never waits on a subscriber and never fails because one did: a
subscriber that raises is logged and counted, and a slow stream subscriber loses its oldest events, not the
daemon's time. Events hold names and outcomes, never secret values (jobs are scrubbed before they are
published).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deployerd.store import Job, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """Base of every event: when it happened (ISO 8601 UTC)."""

    at: str = field(default_factory=utcnow, kw_only=True)

    @property
    def kind(self) -> str:
        """The event's name on the wire (server-sent events, webhooks): ``job_started``, ``host_down``, ..."""
        return _KINDS[type(self)]


@dataclass(frozen=True)
class JobStarted(Event):
    job: Job


@dataclass(frozen=True)
class PhaseChanged(Event):
    job: Job
    phase: str
    status: str  # running | succeeded | failed | skipped
    duration_s: float | None = None
    rollback: bool = False  # a phase of the rollback pass (``Job.rollback_phases``), not of the job's release


@dataclass(frozen=True)
class JobEnded(Event):
    job: Job  # final: status, error, phases, durations, rollback (scrubbed of secret values)


@dataclass(frozen=True)
class RolledBack(Event):
    service: str
    host: str
    failed_release: str
    restored_release: str | None
    phase: str  # the phase whose failure caused it
    ok: bool  # the restored release serves again


@dataclass(frozen=True)
class Quarantined(Event):
    service: str
    release: str
    reason: str


@dataclass(frozen=True)
class Switched(Event):
    """A host's ingress proxy switched a service to a new release (and the old one drained)."""

    service: str
    host: str
    release: str
    switch_s: float
    drain_s: float


@dataclass(frozen=True)
class HostDown(Event):
    host: str
    error: str


@dataclass(frozen=True)
class HostUp(Event):
    host: str


@dataclass(frozen=True)
class ReconcileDone(Event):
    revision: str | None
    trigger: tuple[str, ...]
    duration_s: float
    actions: int
    error: str | None = None
    fetch_error: str | None = None  # git could not be fetched (the last good revision was used, if any)
    commit_time: int | None = None  # the reconciled revision's commit time (Unix seconds)


_KINDS: dict[type[Event], str] = {
    JobStarted: "job_started",
    PhaseChanged: "phase_changed",
    JobEnded: "job_ended",
    RolledBack: "rolled_back",
    Quarantined: "quarantined",
    Switched: "switched",
    HostDown: "host_down",
    HostUp: "host_up",
    ReconcileDone: "reconcile_done",
}

Subscriber = Callable[[Event], Any]


class EventBus:
    """Publish-subscribe within one daemon. ``publish`` is synchronous and never raises: callbacks run
    inline and must be quick (metrics); anything slow subscribes with ``stream()`` and reads on its own task."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._streams: set[asyncio.Queue[Event]] = set()
        self.subscriber_errors = 0

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; returns the function that unsubscribes it."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def stream(self, maxsize: int = 1000) -> _Stream:
        """An async iterator of events for one slow reader (an SSE client, a notifier): bounded, oldest dropped."""
        return _Stream(self, maxsize)

    def publish(self, event: Event) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # a subscriber's fault never reaches a deploy
                self.subscriber_errors += 1
                log.exception("event subscriber %r failed on %s", callback, event.kind)
        for queue in list(self._streams):
            if queue.full():
                queue.get_nowait()  # a slow reader loses its oldest event, never blocks the publisher
            queue.put_nowait(event)


class _Stream:
    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        bus._streams.add(self._queue)

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Event:
        return await self._queue.get()

    def close(self) -> None:
        self._bus._streams.discard(self._queue)

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
