"""The job queue: one job per work key, supersede checks, doubling backoff of failing keys, crashes recorded."""

from __future__ import annotations

import asyncio

from deployerd.backoff import Backoff
from deployerd.jobqueue import BACKOFF_MAX_S, BACKOFF_MIN_S, JobQueue
from deployerd.store import Job, JobStatus


def test_backoff_doubles_from_min_to_max() -> None:
    b = Backoff(2.0, 10.0)
    assert not b.waiting() and b.remaining_s() == 0.0
    assert [b.fail() for _ in range(5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert b.failures == 5 and b.waiting() and 9.0 < b.remaining_s() <= 10.0
    assert not b.waiting(now=b.until) and b.remaining_s(now=b.until + 1) == 0.0


async def _ends(job: Job, status: JobStatus, gate: asyncio.Event | None = None, error: str | None = None) -> Job:
    if gate is not None:
        await gate.wait()
    job.status, job.error = status, error
    return job


async def _never(job: Job, e: Exception) -> Job:
    raise AssertionError(f"unexpected crash: {e}")


async def test_one_job_per_key_and_the_key_is_free_when_it_ends() -> None:
    q, ended, gate = JobQueue(2), [], asyncio.Event()
    job = Job(service="web", host="h")
    q.launch("web", job, _ends(job, JobStatus.SUCCEEDED, gate), crashed=_never, ended=ended.append)
    await asyncio.sleep(0)
    assert q.busy("web") and list(q.in_flight) == ["web"] and not q.busy("api")
    gate.set()
    await q.drain()
    assert not q.busy("web") and ended == [job] and "web" not in q.failing
    assert q.ended_after("web", 0.0) and not q.ended_after("api", 0.0)


async def test_a_job_is_superseded_once_a_newer_release_is_wanted() -> None:
    q = JobQueue(1)
    q.want("web", "r1")
    check = q.superseded("web", "r1")
    assert not check()
    q.want("web", "r2")
    assert check() and not q.superseded("web", "r2")()
    assert not q.superseded("never-wanted", "r9")()


async def test_failing_keys_back_off_doubling_and_a_success_forgets() -> None:
    q = JobQueue(1)
    for n in (1, 2, 3):
        job = Job(service="web", host="h")
        job.transient = True
        q.launch("web", job, _ends(job, JobStatus.FAILED, error="host down"), crashed=_never, ended=lambda j: None)
        await q.drain()
        failing = q.failing["web"]
        assert (failing.failures, failing.error, failing.transient) == (n, "host down", True)
        assert q.backing_off("web")
        want = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (n - 1))
        assert want - 1 < failing.remaining_s() <= want
    job = Job(service="web", host="h")
    q.launch("web", job, _ends(job, JobStatus.SUCCEEDED), crashed=_never, ended=lambda j: None)
    await q.drain()
    assert "web" not in q.failing and not q.backing_off("web")


async def test_a_crashing_job_is_ended_by_the_crash_handler() -> None:
    q, ended = JobQueue(1), []

    async def boom() -> Job:
        raise RuntimeError("kaput")

    async def crashed(job: Job, e: Exception) -> Job:
        job.status, job.error = JobStatus.FAILED, f"{type(e).__name__}: {e}"
        return job

    job = Job(service="web", host="h")
    q.launch("web", job, boom(), crashed=crashed, ended=ended.append)
    await q.drain()
    assert ended == [job] and job.error == "RuntimeError: kaput" and q.failing["web"].failures == 1


async def test_slots_bound_the_jobs_running_at_once() -> None:
    q, running, peak, gate = JobQueue(2), 0, 0, asyncio.Event()

    async def work(job: Job) -> Job:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        return job

    for name in ("a", "b", "c", "d"):
        job = Job(service=name, host="h")
        q.launch(name, job, work(job), crashed=_never, ended=lambda j: None)
    for _ in range(5):
        await asyncio.sleep(0)
    assert running == 2 and len(q.in_flight) == 4
    gate.set()
    await q.drain()
    assert peak == 2
