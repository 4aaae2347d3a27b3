"""What is worth telling: deploy events turned into outcomes, and outcomes deduplicated. Pure, no I/O.

One message per (service, outcome, release) until it changes; a failure that persists is repeated only every
``reminder_s``; a success after a failure is a recovery. A retry of the same failed release (an outage is
retried every 5 to 60 s) says nothing new: not its start (pending), nor its failure again. doco-cd users got
about 240 messages in two hours from one expired token; this is the rule that prevents it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from deployerd.events import Event, JobEnded, JobStarted
from deployerd.store import JobStatus

# Jobs whose outcome a user waits for; prune jobs (a service removed from git) are not deploys.
NOTIFIED_KINDS = frozenset({"deploy", "restore", "register"})


class Outcome(StrEnum):
    PENDING = "pending"  # deploying
    SUCCESS = "success"  # healthy and registered
    FAILURE = "failure"  # rolled back, quarantined, or failed with nothing to roll back to


@dataclass(frozen=True)
class Notice:
    """One message to send: the same for every destination, each renders it its own way."""

    service: str
    outcome: Outcome
    release: str
    commit: str
    host: str
    job_id: str | None
    summary: str  # one line, no secret values (jobs are scrubbed before they are published)
    at: str
    recovered: bool = False  # a success after a failure
    reminder: bool = False  # the same failure, repeated after reminder_s

    @property
    def context(self) -> str:
        """The commit status context: one per service."""
        return f"deployerd/{self.service}"


def notice_of(event: Event) -> Notice | None:
    """The notice an event would make, before deduplication (None: nothing to tell)."""
    if isinstance(event, JobStarted | JobEnded):
        job = event.job
        if job.kind not in NOTIFIED_KINDS or job.managed_by not in ("git", "api"):
            return None

        def told(outcome: Outcome, summary: str) -> Notice:
            return Notice(service=job.service, outcome=outcome, release=job.release, commit=job.commit,
                          host=job.host, job_id=job.id, summary=summary, at=event.at)

        if isinstance(event, JobStarted):
            return told(Outcome.PENDING, f"deploying {job.release} on {job.host}")
        if job.status is JobStatus.SUCCEEDED:
            return told(Outcome.SUCCESS, f"{job.release} healthy and registered on {job.host}")
        if job.status is JobStatus.ROLLED_BACK:
            back = (job.rollback or {}).get("release")
            return told(Outcome.FAILURE, f"{job.release} failed ({job.error}); rolled back to {back}, the failed "
                        "release is quarantined until git changes")
        if job.status is JobStatus.FAILED and not job.transient:
            return told(Outcome.FAILURE, f"{job.release} failed: {job.error}")
        return None  # superseded, interrupted, or an outage retried by itself: no outcome yet
    # Quarantined is not told on its own: it comes with the failed job's JobEnded, which carries the commit
    # (a commit status needs it) and says rolled back or failed; it was published first, and telling it
    # would make the job's own failure a duplicate.
    return None


@dataclass
class _Last:
    outcome: Outcome
    release: str
    sent_at: float
    failing: bool  # the last outcome told was a failure, whatever started since


class Deduper:
    """Decides, per destination, which notices go out. ``now`` is a monotonic clock in seconds."""

    def __init__(self, reminder_s: float) -> None:
        self.reminder_s = reminder_s
        self._last: dict[str, _Last] = {}

    def admit(self, notice: Notice, now: float) -> Notice | None:
        last = self._last.get(notice.service)
        if last is not None and last.release == notice.release:
            if notice.outcome is Outcome.PENDING:
                return None  # a retry of a release already announced
            if notice.outcome is last.outcome:
                if notice.outcome is not Outcome.FAILURE or now - last.sent_at < self.reminder_s:
                    return None
                last.sent_at = now
                return replace(notice, reminder=True)
        failing = last is not None and last.failing
        recovered = failing and notice.outcome is Outcome.SUCCESS
        if notice.outcome is not Outcome.PENDING:
            failing = notice.outcome is Outcome.FAILURE
        self._last[notice.service] = _Last(notice.outcome, notice.release, now, failing)
        return replace(notice, recovered=True) if recovered else notice
