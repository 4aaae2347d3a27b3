"""Which deploy events become notices, and the delivery rule: one message per (service, outcome, release) until
it changes, a reminder for a failure that persists, a recovery when it heals, no storm from retries."""

from __future__ import annotations

from deployerd.events import HostDown, JobEnded, JobStarted, Quarantined
from deployerd.notify.outcomes import Deduper, Notice, Outcome, notice_of
from deployerd.store import Job, JobStatus


def job(status: JobStatus = JobStatus.RUNNING, release: str = "r1", **kw: object) -> Job:
    return Job(service="web", host="h1", release=release, commit="a" * 40, status=status, **kw)  # type: ignore[arg-type]


def n(outcome: Outcome, release: str = "r1") -> Notice:
    return Notice(service="web", outcome=outcome, release=release, commit="a" * 40, host="h1", job_id="j",
                  summary="s", at="t")


def test_events_map_to_outcomes() -> None:
    assert notice_of(JobStarted(job=job())).outcome is Outcome.PENDING  # type: ignore[union-attr]
    assert notice_of(JobEnded(job=job(JobStatus.SUCCEEDED))).outcome is Outcome.SUCCESS  # type: ignore[union-attr]
    rolled = notice_of(JobEnded(job=job(JobStatus.ROLLED_BACK, error="health", rollback={"release": "r0"})))
    assert rolled is not None and rolled.outcome is Outcome.FAILURE and "rolled back to r0" in rolled.summary
    assert notice_of(JobEnded(job=job(JobStatus.FAILED, error="x"))).outcome is Outcome.FAILURE  # type: ignore[union-attr]
    # a quarantine comes with its job's failure (JobEnded), which is the one told
    assert notice_of(Quarantined(service="web", release="r1", reason="health")) is None
    # an outage retried by itself, a superseded job, a prune and other events tell nothing
    assert notice_of(JobEnded(job=job(JobStatus.FAILED, transient=True))) is None
    assert notice_of(JobEnded(job=job(JobStatus.SUPERSEDED))) is None
    assert notice_of(JobStarted(job=job(kind="prune"))) is None
    assert notice_of(HostDown(host="h1", error="x")) is None


def test_one_message_per_outcome_until_it_changes() -> None:
    d = Deduper(reminder_s=3600)
    assert d.admit(n(Outcome.PENDING), 0) is not None
    assert d.admit(n(Outcome.SUCCESS), 1) is not None
    assert d.admit(n(Outcome.PENDING), 2) is None  # drift healed: the same release again
    assert d.admit(n(Outcome.SUCCESS), 3) is None
    assert d.admit(n(Outcome.PENDING, "r2"), 4) is not None  # a new release is news
    assert d.admit(n(Outcome.SUCCESS, "r2"), 5) is not None


def test_a_persisting_failure_is_repeated_only_at_the_reminder_interval_then_recovers() -> None:
    d = Deduper(reminder_s=600)
    sent = []
    assert d.admit(n(Outcome.PENDING), 0)
    first = d.admit(n(Outcome.FAILURE), 1)
    assert first is not None and not first.reminder
    # two hours of retries every 30 s (pending, failure): only the reminders get out
    for t in range(31, 7200, 30):
        for outcome in (Outcome.PENDING, Outcome.FAILURE):
            got = d.admit(n(outcome), t)
            if got is not None:
                sent.append(got)
    assert len(sent) == 11 and all(s.reminder and s.outcome is Outcome.FAILURE for s in sent), sent
    healed = d.admit(n(Outcome.SUCCESS), 7300)
    assert healed is not None and healed.recovered


def test_recovery_is_told_by_a_new_release_that_fixes_the_failure() -> None:
    d = Deduper(reminder_s=600)
    d.admit(n(Outcome.FAILURE, "r1"), 0)
    assert d.admit(n(Outcome.PENDING, "r2"), 1) is not None
    fixed = d.admit(n(Outcome.SUCCESS, "r2"), 2)
    assert fixed is not None and fixed.recovered
    again = d.admit(n(Outcome.SUCCESS, "r3"), 3)
    assert again is not None and not again.recovered


def test_services_are_independent() -> None:
    d = Deduper(reminder_s=600)
    other = Notice(service="api", outcome=Outcome.FAILURE, release="r1", commit="", host="h", job_id=None,
                   summary="s", at="t")
    assert d.admit(n(Outcome.FAILURE), 0) is not None
    assert d.admit(other, 0) is not None
    assert d.admit(other, 1) is None
