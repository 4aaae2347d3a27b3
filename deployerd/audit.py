"""The audit trail: one JSON line per finished job in ``state_dir/audit.jsonl``, and its read-out.

Who (the commit's author and committer from git, or the API token's name), the trigger (watch, poll, webhook,
api, sync, resync), the service, release, commit and message, hosts, phases, outcome and duration.

Append-only: the file is opened with O_APPEND (each record is one ``write`` at the end, never a rewrite) and
created 0600; each record is fsynced before the next is written, so a record the daemon reported is on disk
even after a power cut (jobs are few: a fsync each costs nothing that matters). One task writes, so records
never interleave. A record never holds a secret value: it is built from the published job, whose error and
phases are scrubbed of the service's secret values, and it carries no logs, no env, no spec.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from deployerd.events import Event, EventBus, JobEnded
from deployerd.source import read_commit
from deployerd.store import Job
from deployerd.worker import Worker

log = logging.getLogger(__name__)

QUEUE_MAX = 10000
ERROR_MAX = 500


class Who(BaseModel):
    author: str | None = None  # "Name <email>" from git
    committer: str | None = None
    token: str | None = None  # the API token's name, for jobs the API started


class CommitInfo(BaseModel):
    author: str
    committer: str
    message: str


class PhaseLine(BaseModel):
    phase: str
    status: str
    duration_s: float | None = None


class AuditRecord(BaseModel):
    at: str
    job_id: str
    service: str
    kind: str
    trigger: str
    who: Who
    release: str
    previous_release: str | None = None
    commit: str
    message: str | None = None
    hosts: list[str]
    phases: list[PhaseLine] = Field(default_factory=list)
    outcome: str
    error: str | None = None
    rolled_back_to: str | None = None
    duration_s: float | None = None


CommitLookup = Callable[[str], Awaitable[CommitInfo | None]]


def git_commit_info(repo_path: Path) -> CommitLookup:
    """A lookup of author, committer and message in the daemon's mirror of the repository (argv, no shell)."""

    def read(sha: str) -> CommitInfo | None:
        info = read_commit(repo_path, sha)
        return CommitInfo(author=info.author, committer=info.committer, message=info.message) if info else None

    async def lookup(sha: str) -> CommitInfo | None:
        return await asyncio.to_thread(read, sha)

    return lookup


def record_of(job: Job, commit: CommitInfo | None, token_name: str, at: str) -> AuditRecord:
    """The job as the audit trail keeps it (pure)."""
    by_token = job.trigger in ("api", "sync")
    return AuditRecord(
        at=job.completed_at or at, job_id=job.id, service=job.service, kind=job.kind, trigger=job.trigger,
        who=Who(author=commit.author if commit else None, committer=commit.committer if commit else None,
                token=token_name if by_token else None),
        release=job.release, previous_release=job.previous_release, commit=job.commit,
        message=commit.message if commit else None, hosts=[job.host],
        phases=[PhaseLine(phase=p.phase, status=p.status.value, duration_s=p.duration_seconds) for p in job.phases],
        outcome=job.status.value, error=job.error[:ERROR_MAX] if job.error else None,
        rolled_back_to=(job.rollback or {}).get("release"), duration_s=job.duration_seconds,
    )


def append(path: Path, record: AuditRecord) -> None:
    """One line at the end of the file (O_APPEND, created 0600), fsynced."""
    line = (record.model_dump_json() + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditLog:
    """The bus subscriber that writes the trail: the callback enqueues, a task of its own writes (a deploy
    never waits on the disk)."""

    def __init__(self, path: Path, commit_info: CommitLookup, token_name: str) -> None:
        self.path = path
        self.commit_info = commit_info
        self.token_name = token_name
        self.errors = 0
        self._worker: Worker[JobEnded] = Worker("audit trail", self._write_event, QUEUE_MAX)
        self._unsubscribe: Callable[[], None] = lambda: None

    def start(self, bus: EventBus) -> None:
        self._unsubscribe = bus.subscribe(self.on_event)
        self._worker.start()

    def on_event(self, event: Event) -> None:
        # thousands of jobs behind a stuck disk: say so rather than grow
        if isinstance(event, JobEnded) and not self._worker.put(event):
            self.errors += 1
            log.error("audit trail: %s is not being written; the record of job %s is lost", self.path, event.job.id)

    async def _write_event(self, event: JobEnded) -> None:
        await self.write(event.job, event.at)

    async def write(self, job: Job, at: str) -> None:
        try:
            commit = await self.commit_info(job.commit) if job.commit else None
            await asyncio.to_thread(append, self.path, record_of(job, commit, self.token_name, at))
        except Exception:  # the trail's fault never reaches a deploy; it is logged loudly
            self.errors += 1
            log.exception("audit trail: could not write the record of job %s to %s", job.id, self.path)

    async def drain(self, limit_s: float = 30.0) -> None:
        """Wait (bounded) until every record handed over is written: at the daemon's stop, and in tests."""
        await self._worker.drain(limit_s)

    async def close(self) -> None:
        self._unsubscribe()
        await self._worker.drain()
        await self._worker.close()


# ---------------------------------------------------------------------------------------------- reading
_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30m``, ``2h``, ``7d``, ``1w`` ago, or an ISO date or time (UTC unless it says otherwise)."""
    now = now or datetime.now(UTC)
    text = text.strip()
    if m := _RELATIVE.match(text):
        try:
            return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        except OverflowError:
            raise ValueError(f"--since {text!r}: too far back") from None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r}: give a duration (30m, 2h, 7d, 1w) or an ISO date or time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _at(record: AuditRecord) -> datetime:
    return datetime.fromisoformat(record.at.replace("Z", "+00:00"))


def read_records(lines: Iterable[str], service: str | None = None, since: datetime | None = None,
                 ) -> tuple[list[AuditRecord], int]:
    """The records that match, oldest first, and how many lines could not be read (a torn last line)."""
    out, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = AuditRecord.model_validate_json(line)
        except ValidationError:
            bad += 1
            continue
        if service is not None and rec.service != service:
            continue
        if since is not None and _at(rec) < since:
            continue
        out.append(rec)
    return out, bad


def read_file(path: Path, service: str | None = None, since: datetime | None = None,
              ) -> tuple[list[AuditRecord], int]:
    if not path.exists():
        return [], 0
    with path.open(encoding="utf-8", errors="replace") as f:
        return read_records(f, service, since)


def _who(who: Who) -> str:
    if who.token:
        return f"token:{who.token}"
    name = (who.author or "-").split(" <")[0]
    committer = (who.committer or "").split(" <")[0]
    return name if not committer or committer == name else f"{name} (via {committer})"


def table(records: list[AuditRecord]) -> str:
    """A readable table, one line per job."""
    head = ("TIME (UTC)", "SERVICE", "KIND", "TRIGGER", "WHO", "OUTCOME", "SECONDS", "RELEASE", "COMMIT", "MESSAGE")
    rows = [head]
    for r in records:
        rows.append((
            r.at[:19].replace("T", " "), r.service, r.kind, r.trigger, _who(r.who), r.outcome,
            "-" if r.duration_s is None else f"{r.duration_s:.1f}", r.release[:16] or "-", r.commit[:10] or "-",
            ((r.message or "").splitlines() or [""])[0][:60],
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in rows
    ).rstrip() + "\n"
