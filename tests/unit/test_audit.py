"""The audit trail: one record per finished job from the event stream, appended (never rewritten), read back
with filters, shown as a table."""

from __future__ import annotations

import asyncio
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deployerd.audit import AuditLog, CommitInfo, git_commit_info, parse_since, read_file, table
from deployerd.events import EventBus, JobEnded, JobStarted
from deployerd.store import Job, JobStatus, PhaseRecord, PhaseStatus


def finished(service: str, status: JobStatus, at: str, trigger: str = "watch", **kw: object) -> Job:
    return Job(service=service, host="h1", release="r-" + service, commit="ab" * 20, status=status, trigger=trigger,
               completed_at=at, duration_seconds=12.5,
               phases=[PhaseRecord(phase="Validation", status=PhaseStatus.SUCCEEDED, duration_seconds=0.1)],
               **kw)  # type: ignore[arg-type]


async def test_each_finished_job_appends_one_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"a torn line from a crash"\n')  # what was there stays: the file is only appended to
    async def lookup(sha: str) -> CommitInfo | None:
        return CommitInfo(author="Ada <ada@example.org>", committer="CI <ci@example.org>", message="web: v2\n\nbody")
    bus = EventBus()
    audit = AuditLog(path, lookup, "ops-token")
    audit.start(bus)
    bus.publish(JobStarted(job=finished("web", JobStatus.RUNNING, "")))  # not a finished job: no record
    bus.publish(JobEnded(job=finished("web", JobStatus.SUCCEEDED, "2026-12-01T10:00:00.000000Z")))
    bus.publish(JobEnded(job=finished("api", JobStatus.ROLLED_BACK, "2026-12-01T11:00:00.000000Z", trigger="sync",
                                      error="health check failed", rollback={"release": "r-old"})))
    await audit.close()  # writes what it was handed first
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines[0] == '{"a torn line from a crash"'
    records, bad = read_file(path)
    assert bad == 1 and [r.service for r in records] == ["web", "api"]
    web, api = records
    assert web.who.author == "Ada <ada@example.org>" and web.who.committer == "CI <ci@example.org>"
    assert web.who.token is None and web.trigger == "watch" and web.message == "web: v2\n\nbody"
    assert web.phases[0].phase == "Validation" and web.outcome == "succeeded" and web.duration_s == 12.5
    assert api.who.token == "ops-token" and api.rolled_back_to == "r-old" and api.error == "health check failed"
    only_api, _ = read_file(path, service="api")
    assert [r.service for r in only_api] == ["api"]
    late, _ = read_file(path, since=datetime(2026, 12, 1, 10, 30, tzinfo=UTC))
    assert [r.service for r in late] == ["api"]
    text = table(records)
    assert text.splitlines()[0].startswith("TIME (UTC)")
    assert "Ada (via CI)" in text and "token:ops-token" in text and "rolled_back" in text and "web: v2" in text


async def test_a_new_file_is_created_private(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async def lookup(sha: str) -> CommitInfo | None:
        return None
    audit = AuditLog(path, lookup, "t")
    await audit.write(finished("web", JobStatus.SUCCEEDED, "2026-12-01T10:00:00Z"), "x")
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_commit_info_from_git(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    env = {**os.environ, "GIT_AUTHOR_NAME": "Ada", "GIT_AUTHOR_EMAIL": "ada@example.org",
           "GIT_COMMITTER_NAME": "Bot", "GIT_COMMITTER_EMAIL": "bot@example.org"}
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "web: v3"], check=True, env=env)
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                         text=True).stdout.strip()
    info = asyncio.run(git_commit_info(repo)(sha))
    assert info == CommitInfo(author="Ada <ada@example.org>", committer="Bot <bot@example.org>", message="web: v3")
    assert asyncio.run(git_commit_info(repo)("0" * 40)) is None
    assert asyncio.run(git_commit_info(repo)("--output=/tmp/x")) is None  # never an option to git


def test_since() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2026-11-30", now) == datetime(2026, 11, 30, tzinfo=UTC)
    assert parse_since("2026-11-30T08:00:00+01:00", now) == datetime(2026, 11, 30, 7, tzinfo=UTC)
    with pytest.raises(ValueError, match="--since 'yesterday'"):
        parse_since("yesterday", now)
