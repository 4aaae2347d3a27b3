"""Live updates of the status page: the event stream as server-sent events, and the page parts that changed.

A browser keeps one ``EventSource`` on ``/ui/events``. For every event of the bus it gets the event's summary
(names and states only) and the HTML of the parts of its page whose rendering changed since it last got them,
so nothing polls and an unchanged page costs no bytes. Renders are shared: a burst of events is rendered once
per page however many browsers watch, and each connection only compares strings.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from deployerd.events import (
    Event,
    EventBus,
    HostDown,
    HostUp,
    JobEnded,
    JobStarted,
    PhaseChanged,
    Quarantined,
    ReconcileDone,
    RolledBack,
)
from deployerd.ui.views import LiveJob

COALESCE_S = 0.05  # events this close together make one render
KEEPALIVE_S = 15.0  # a comment line this often: proxies keep the stream open, and a gone browser is noticed


class LiveJobs:
    """What the event stream said is running now (service -> job and phase), and since when each host answers.

    The engine's status rows change at each reconcile; between two, this is what shows a deploy's progress."""

    def __init__(self) -> None:
        self._jobs: dict[str, LiveJob] = {}
        self.up_since: dict[str, str] = {}
        self.generation = 0  # bumped by every event: a cached render older than this is stale

    def get(self, service: str) -> LiveJob | None:
        return self._jobs.get(service)

    def __call__(self, event: Event) -> None:
        self.generation += 1
        if isinstance(event, JobStarted):
            self._jobs[event.job.service] = LiveJob(job_id=event.job.id, kind=event.job.kind)
        elif isinstance(event, PhaseChanged):
            live = self._jobs.setdefault(event.job.service, LiveJob(job_id=event.job.id, kind=event.job.kind))
            if event.status == "running":
                live.phase = event.phase
        elif isinstance(event, JobEnded):
            current = self._jobs.get(event.job.service)
            if current is not None and current.job_id == event.job.id:
                del self._jobs[event.job.service]
        elif isinstance(event, HostUp):
            self.up_since[event.host] = event.at
        elif isinstance(event, HostDown):
            self.up_since.pop(event.host, None)

    def observed(self, reachable: dict[str, bool], at: str) -> None:
        """After a reconcile: a host first seen answering is up since then."""
        for host, up in reachable.items():
            if up:
                self.up_since.setdefault(host, at)
            else:
                self.up_since.pop(host, None)


def summary(event: Event) -> dict[str, Any]:
    """An event as the browser gets it: names, states and ids, never a log line, an error text or an env value."""
    out: dict[str, Any] = {"kind": event.kind, "at": event.at}
    if isinstance(event, (JobStarted, PhaseChanged, JobEnded)):
        job = event.job
        out.update(service=job.service, host=job.host, job=job.id, release=job.release, status=job.status.value)
        if isinstance(event, PhaseChanged):
            out.update(phase=event.phase, status=event.status, duration_s=event.duration_s)
    elif isinstance(event, RolledBack):
        out.update(service=event.service, host=event.host, release=event.failed_release,
                   restored=event.restored_release, phase=event.phase, ok=event.ok)
    elif isinstance(event, Quarantined):
        out.update(service=event.service, release=event.release)
    elif isinstance(event, (HostDown, HostUp)):
        out.update(host=event.host)
    elif isinstance(event, ReconcileDone):
        out.update(revision=event.revision, actions=event.actions, ok=event.error is None)
    return out


@dataclass
class Rendered:
    """A page's main content and its updatable parts (DOM id -> HTML), in page order."""

    main: str
    parts: dict[str, str]


Render = Callable[[], Awaitable[Rendered]]


class Renders:
    """Renders shared by every connection watching the same page, redone only after new events."""

    def __init__(self, live: LiveJobs) -> None:
        self._live = live
        self._cache: dict[str, tuple[int, Rendered]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, key: str, render: Render) -> Rendered:
        async with self._locks.setdefault(key, asyncio.Lock()):
            generation = self._live.generation
            cached = self._cache.get(key)
            if cached is not None and cached[0] == generation:
                return cached[1]
            rendered = await render()
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = (generation, rendered)
            return rendered


def sse(event: str, data: Any) -> str:
    """One server-sent event; the JSON has no raw newline, so one ``data:`` line carries it."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def stream(bus: EventBus, renders: Renders, key: str, render: Render,
                 disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
    """The SSE body for one browser on one page: at start the whole page (it may have changed since it was
    served), then each event's summary and the parts that changed."""
    with bus.stream() as events:
        sent = await renders.get(key, render)
        yield "retry: 2000\n\n"
        yield sse("main", {"html": sent.main})
        pending: list[Event] = []
        while True:
            try:
                pending.append(await asyncio.wait_for(anext(events), KEEPALIVE_S))
            except TimeoutError:
                if await disconnected():
                    return
                yield ": keepalive\n\n"
                continue
            deadline = asyncio.get_running_loop().time() + COALESCE_S
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    pending.append(await asyncio.wait_for(anext(events), left))
                except TimeoutError:
                    break
            for event in pending:
                yield sse(event.kind, summary(event))
            pending.clear()
            now = await renders.get(key, render)
            if list(now.parts) != list(sent.parts):  # rows or columns came or went: the whole page
                yield sse("main", {"html": now.main})
            else:
                changed = {k: v for k, v in now.parts.items() if sent.parts.get(k) != v}
                if changed:
                    yield sse("parts", {"html": changed})
            sent = now
