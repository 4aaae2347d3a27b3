"""The job queue: jobs in flight by work key, at most one per key and ``max_parallel`` at once.

A work key names what one job may change at a time: today a service (one host each); after the fleet work a
(service, host) or a rollout. Per key the queue keeps the release the latest reconcile wants (a running job
whose release is no longer wanted is superseded at its next phase boundary), when its last job ended, and the
backoff of a key whose jobs fail: 5 s doubling to 60 s (a new commit skips the wait), so an outage is
retried without hammering a host and a job that keeps failing never spins.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field

from deployerd.backoff import Backoff
from deployerd.store import Job, JobStatus

WorkKey = str

# A failed job's key waits 5 s, doubling to 60 s, before its next try: a part that comes back is retried
# within a minute, like a resync.
BACKOFF_MIN_S, BACKOFF_MAX_S = 5.0, 60.0


@dataclass
class Failing:
    """A key whose last job failed: its backoff and that failure (/health shows the transient ones)."""

    backoff: Backoff = field(default_factory=lambda: Backoff(BACKOFF_MIN_S, BACKOFF_MAX_S))
    error: str = ""
    transient: bool = False

    @property
    def failures(self) -> int:
        return self.backoff.failures

    def remaining_s(self, now: float | None = None) -> float:
        return self.backoff.remaining_s(now)


class JobQueue:
    def __init__(self, max_parallel: int) -> None:
        self._inflight: dict[WorkKey, asyncio.Task[Job]] = {}
        self._wanted: dict[WorkKey, str] = {}  # key -> release the latest reconcile wants
        self._ended: dict[WorkKey, float] = {}  # key -> monotonic time its last job ended
        self.failing: dict[WorkKey, Failing] = {}
        self._slots = asyncio.Semaphore(max_parallel)
        self._changes: dict[WorkKey, asyncio.Event] = {}  # key -> set when the release it wants changes

    @property
    def in_flight(self) -> Collection[WorkKey]:
        return self._inflight.keys()

    def busy(self, key: WorkKey) -> bool:
        return key in self._inflight

    def want(self, key: WorkKey, release: str) -> None:
        """The latest reconcile wants ``release`` for ``key``."""
        if self._wanted.get(key) != release and (changed := self._changes.pop(key, None)) is not None:
            changed.set()
        self._wanted[key] = release

    async def wait_superseded(self, key: WorkKey, release: str, timeout_s: float) -> bool:
        """Wait ``timeout_s`` (a rollout's pause between waves); True, at once, if another release is wanted
        for ``key`` meanwhile (a newer commit does not wait for the pause)."""
        if self._wanted.get(key, release) != release:
            return True
        changed = self._changes.setdefault(key, asyncio.Event())
        try:
            await asyncio.wait_for(changed.wait(), timeout_s)
        except TimeoutError:
            return self._wanted.get(key, release) != release
        return True

    def superseded(self, key: WorkKey, release: str) -> Callable[[], bool]:
        """A job's check, at each phase boundary, that its release is still the one wanted."""
        return lambda: self._wanted.get(key, release) != release

    def ended_after(self, key: WorkKey, t: float) -> bool:
        """Whether a job for ``key`` ended after monotonic time ``t`` (the facts read before are stale)."""
        return self._ended.get(key, 0.0) > t

    def backing_off(self, key: WorkKey, now: float | None = None) -> bool:
        failing = self.failing.get(key)
        return failing is not None and failing.backoff.waiting(now)

    def launch(self, key: WorkKey, job: Job, work: Awaitable[Job], *,
               crashed: Callable[[Job, Exception], Awaitable[Job]], ended: Callable[[Job], None]) -> None:
        """Run ``work`` (which ends ``job``) when a slot is free. ``crashed`` ends a job whose work raised;
        ``ended`` is called once the key is free again."""
        async def runner() -> Job:
            async with self._slots:
                try:
                    return await work
                except Exception as e:  # a job must always end recorded, whatever broke
                    return await crashed(job, e)
                finally:
                    self._inflight.pop(key, None)
                    self._ended[key] = time.monotonic()
                    self._record(key, job)
                    ended(job)

        self._inflight[key] = asyncio.create_task(runner(), name=f"job {job.id} {key}")

    def _record(self, key: WorkKey, job: Job) -> None:
        if job.status is JobStatus.FAILED:
            failing = self.failing.setdefault(key, Failing())
            failing.error, failing.transient = job.error or "failed", job.transient
            failing.backoff.fail()
        else:
            self.failing.pop(key, None)

    async def drain(self) -> None:
        """Wait for the jobs in flight (at shutdown, and by tests)."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight.values()), return_exceptions=True)
