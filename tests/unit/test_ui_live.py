"""The status page's live stream: what one browser is sent for each event (pure: a bus and canned renders)."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployerd.events import EventBus, JobEnded, JobStarted, PhaseChanged, ReconcileDone
from deployerd.store import Job, JobStatus
from deployerd.ui.live import LiveJobs, Rendered, Renders, stream, summary


def test_a_summary_holds_names_and_states_never_logs_or_errors() -> None:
    job = Job(service="web", host="h1", release="r1", status=JobStatus.FAILED, error="token hunter2 refused",
              logs=["echo hunter2"], reasons=["hunter2 in reasons"])
    for event in (JobStarted(job=job), JobEnded(job=job), PhaseChanged(job=job, phase="Build", status="failed")):
        text = json.dumps(summary(event))
        assert "hunter2" not in text
        assert summary(event)["service"] == "web" and summary(event)["kind"] == event.kind


def test_live_jobs_follow_a_job_through_its_phases() -> None:
    live = LiveJobs()
    job = Job(service="web", host="h1")
    live(JobStarted(job=job))
    live(PhaseChanged(job=job, phase="Transfer", status="running"))
    got = live.get("web")
    assert got is not None and (got.phase, got.step) == ("Transfer", 2)
    live(JobEnded(job=Job(service="web", host="h1")))  # another job's end leaves this one
    assert live.get("web") is not None
    live(JobEnded(job=job))
    assert live.get("web") is None and live.generation == 4


async def _next(body: object) -> str:
    return await asyncio.wait_for(anext(body), 5)  # type: ignore[call-overload, no-any-return]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_browser_gets_the_page_then_only_the_parts_that_changed() -> None:
    bus, live = EventBus(), LiveJobs()
    bus.subscribe(live)
    pages = {0: Rendered(main="M0", parts={"a": "A0", "b": "B0"}), 1: Rendered(main="M1", parts={"a": "A0", "b": "B1"}),
             2: Rendered(main="M1", parts={"a": "A0", "b": "B1"}), 3: Rendered(main="M3", parts={"a": "A0"})}

    async def render() -> Rendered:  # the page as it is after N events
        return pages[live.generation]

    async def connected() -> bool:
        return False

    body = stream(bus, Renders(live), "overview:", render, connected)
    done = ReconcileDone(revision="abc", trigger=("test",), duration_s=0.1, actions=1)
    assert await _next(body) == "retry: 2000\n\n"
    assert await _next(body) == 'event: main\ndata: {"html":"M0"}\n\n'
    bus.publish(done)
    assert (await _next(body)).startswith("event: reconcile_done\n")
    assert await _next(body) == 'event: parts\ndata: {"html":{"b":"B1"}}\n\n'
    bus.publish(done)  # nothing changes: the event alone, then the stream waits
    assert (await _next(body)).startswith("event: reconcile_done\n")
    waiting = asyncio.ensure_future(_next(body))
    for _ in range(50):  # let it render, compare and wait for the next event (no I/O: a few loop turns)
        await asyncio.sleep(0)
    assert not waiting.done()
    bus.publish(done)  # a part went away: the whole page
    assert (await waiting).startswith("event: reconcile_done\n")
    assert await _next(body) == 'event: main\ndata: {"html":"M3"}\n\n'
    await body.aclose()  # type: ignore[attr-defined]
    assert not bus._streams  # the browser's stream left the bus
