"""Durable memory of the daemon: jobs with their phases, releases known good or failed, quarantines.

The older Deployer kept jobs in memory and lost them on restart; here every job is written to SQLite at each
phase boundary, so history, the last good release and quarantines survive a restart, and a job cut short by a
crash is found as ``running`` at start-up and marked ``interrupted``.
All SQLite work happens on one dedicated thread: the event loop never blocks, and writes never interleave.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T")

PHASES = ("Validation", "Transfer", "Build", "Start Service", "Verify Health", "Register with Registry")


def utcnow() -> str:
    """ISO 8601 UTC ending in Z, as the Registry contract and the older API write timestamps."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_job_id() -> str:
    return f"deploy-{secrets.token_hex(4)}"


class JobStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # failed and nothing to roll back to
    ROLLED_BACK = "rolled_back"  # failed, the last good release serves again
    INTERRUPTED = "interrupted"  # the daemon stopped while it ran
    SUPERSEDED = "superseded"  # a newer commit replaced it at a phase boundary

    @property
    def finished(self) -> bool:
        return self not in (JobStatus.PENDING, JobStatus.RUNNING)


class PhaseStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


class PhaseRecord(BaseModel):
    phase: str
    status: PhaseStatus = PhaseStatus.PENDING
    started_at: str | None = None
    completed_at: str | None = None
    duration_seconds: float | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


class Job(BaseModel):
    """One deploy (or prune, or rollback) of one service, as recorded and as the API shows it."""

    id: str = Field(default_factory=new_job_id)
    service: str
    host: str
    method: str = "docker"
    kind: str = "deploy"  # deploy | register | prune | restore | rollout (a fleet's waves: see rollout.py)
    trigger: str = "poll"  # watch | poll | webhook (a new commit) | api | sync | resync (source.job_trigger) | heal
    managed_by: str = "git"
    commit: str = ""
    release: str = ""
    previous_release: str | None = None
    reasons: list[str] = Field(default_factory=list)
    status: JobStatus = JobStatus.PENDING
    error: str | None = None
    transient: bool = False  # failed on an outage (host, Registry): retried with backoff, never quarantined
    rollback: dict[str, Any] | None = None  # what the rollback did, when one ran
    logs: list[str] = Field(default_factory=list)  # last log lines of a failed release
    service_port: int | None = None
    service_url: str | None = None
    service_path: str | None = None
    droplet_id: int | None = None
    request: dict[str, Any] | None = None  # the older API's request as sent (env var names, never values)
    registration: dict[str, Any] | None = None
    phases: list[PhaseRecord] = Field(default_factory=list)
    rollback_phases: list[PhaseRecord] = Field(default_factory=list)  # the restored release's pass, if any
    parent: str | None = None  # a fleet host's job: the id of the rollout it is part of
    children: list[str] = Field(default_factory=list)  # a rollout: its per-host jobs, in the order they started
    waves: list[list[str]] = Field(default_factory=list)  # a rollout: the hosts of each wave, canary first
    created_at: str = Field(default_factory=utcnow)
    started_at: str | None = None
    completed_at: str | None = None
    duration_seconds: float | None = None

    def phase(self, name: str) -> PhaseRecord:
        for p in self.phases:
            if p.phase == name:
                return p
        record = PhaseRecord(phase=name)
        self.phases.append(record)
        return record


class ReleaseRecord(BaseModel):
    """A release of a service. A fleet's release has one id on every host: one record, ``hosts`` naming each
    host it was deployed on (``spec["hosts"]`` keeps each one's HostSpec and inputs, to restore it there)."""

    service: str
    release: str
    host: str  # the host that saved it last
    method: str
    commit: str
    status: str  # good | failed
    created_at: str
    last_good_at: str | None = None
    spec: dict[str, Any] = Field(default_factory=dict)  # the ServiceSpec it was built from (out-of-band deploys)
    hosts: list[str] = Field(default_factory=list)  # every host it was deployed on (older records: empty)

    @property
    def ran_on(self) -> list[str]:
        return self.hosts or [self.host]


class OutOfBandService(BaseModel):
    """A service the older POST /deploy deployed: the release that should run (its last good one) and where.
    Reconciles heal and register it again like a git service; only DELETE /deploy/services/{name} removes it."""

    service: str
    host: str
    release: str
    updated_at: str = Field(default_factory=utcnow)


class Quarantine(BaseModel):
    service: str
    release: str
    job_id: str
    reason: str
    created_at: str


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, service TEXT NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_service ON jobs(service, created_at);
CREATE TABLE IF NOT EXISTS releases (
  service TEXT NOT NULL, release TEXT NOT NULL, body TEXT NOT NULL, status TEXT NOT NULL, last_good_at TEXT,
  PRIMARY KEY (service, release));
CREATE TABLE IF NOT EXISTS quarantine (service TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS out_of_band (service TEXT PRIMARY KEY, body TEXT NOT NULL);
"""


class Store:
    """SQLite-backed store. Use ``await Store.open(path)``; every method is async and runs on one thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deployerd-store")
        self._db: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path) -> Store:
        store = cls(path)
        await store._call(store._connect)
        return store

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self._db = db

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def close(self) -> None:
        if self._db is not None:
            await self._call(self._db.close)
            self._db = None
        self._pool.shutdown(wait=True)

    def _exec(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        assert self._db is not None, "store is closed"
        return self._db.execute(sql, params).fetchall()

    # jobs
    async def save_job(self, job: Job) -> None:
        body = job.model_dump_json()
        await self._call(
            self._exec,
            "INSERT INTO jobs(id, service, status, created_at, body) VALUES (?,?,?,?,?) "
            "ON CONFLICT(id) DO UPDATE SET status=excluded.status, body=excluded.body",
            (job.id, job.service, job.status.value, job.created_at, body),
        )

    async def job(self, job_id: str) -> Job | None:
        rows = await self._call(self._exec, "SELECT body FROM jobs WHERE id=?", (job_id,))
        return Job.model_validate_json(rows[0][0]) if rows else None

    async def jobs(self, service: str | None = None, limit: int = 50) -> list[Job]:
        if service is None:
            rows = await self._call(self._exec, "SELECT body FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        else:
            rows = await self._call(
                self._exec,
                "SELECT body FROM jobs WHERE service=? ORDER BY created_at DESC LIMIT ?",
                (service, limit),
            )
        return [Job.model_validate_json(r[0]) for r in rows]

    async def mark_interrupted(self) -> list[str]:
        """At start-up: jobs still ``running`` or ``pending`` were cut short by a stop or a crash."""
        rows = await self._call(self._exec, "SELECT body FROM jobs WHERE status IN ('running', 'pending')")
        ids = []
        for (body,) in rows:
            job = Job.model_validate_json(body)
            job.status = JobStatus.INTERRUPTED
            job.error = "the daemon stopped while this job ran"
            job.completed_at = utcnow()
            for p in job.phases:
                if p.status is PhaseStatus.RUNNING:
                    p.status, p.error = PhaseStatus.FAILED, "interrupted"
            await self.save_job(job)
            ids.append(job.id)
        return ids

    async def interrupted_deploys(self) -> dict[str, str]:
        """Services whose latest job is a git deploy cut short by a stop or crash -> the release it deployed.

        Such a release may already run on its host, looking in sync, without having been verified healthy,
        registered or retained: the planner deploys it again (the kept artifact makes that cheap). A fleet's
        rollout record is not a deploy: its host jobs are, and one of them cut short counts, even when a host
        of the same wave started after it and ended."""
        rows = await self._call(
            self._exec,
            "SELECT body FROM jobs j WHERE json_extract(body, '$.kind') != 'rollout' AND (status = 'interrupted' "
            "OR created_at = (SELECT MAX(created_at) FROM jobs k WHERE k.service = j.service "
            "AND json_extract(k.body, '$.kind') != 'rollout'))",
        )
        jobs = [Job.model_validate_json(body) for (body,) in rows]
        latest: dict[str, Job] = {}
        for j in jobs:
            if j.service not in latest or j.created_at > latest[j.service].created_at:
                latest[j.service] = j
        out = {}
        for j in sorted(jobs, key=lambda j: j.created_at):
            last = latest[j.service]
            cut = j is last or (j.parent is not None and j.parent == last.parent)
            if cut and j.status is JobStatus.INTERRUPTED and j.kind == "deploy" and j.managed_by == "git" \
                    and j.release:
                out[j.service] = j.release
        return out

    # releases
    async def save_release(self, rec: ReleaseRecord) -> None:
        """Insert or update ``rec``; a fleet release saved by another host keeps the hosts saved before."""
        await self._call(self._save_release, rec)

    def _save_release(self, rec: ReleaseRecord) -> None:  # on the store's thread: read and write are one step
        rows = self._exec("SELECT body FROM releases WHERE service=? AND release=?", (rec.service, rec.release))
        if rows:
            old = ReleaseRecord.model_validate_json(rows[0][0])
            hosts = [h for h in old.hosts if h not in rec.hosts] + rec.hosts
            spec_hosts = {**old.spec.get("hosts", {}), **rec.spec.get("hosts", {})}
            rec = rec.model_copy(update={"hosts": hosts, "spec": {**rec.spec, "hosts": spec_hosts}})
        self._exec(
            "INSERT INTO releases(service, release, body, status, last_good_at) VALUES (?,?,?,?,?) "
            "ON CONFLICT(service, release) DO UPDATE SET body=excluded.body, status=excluded.status, "
            "last_good_at=COALESCE(excluded.last_good_at, releases.last_good_at)",
            (rec.service, rec.release, rec.model_dump_json(), rec.status, rec.last_good_at),
        )

    async def set_release_status(self, service: str, release: str, status: str) -> None:
        """Mark a recorded release ``good`` or ``failed`` (a fleet's verdict on it, whatever a host said)."""
        await self._call(
            self._exec,
            "UPDATE releases SET status=?, body=json_set(body, '$.status', ?) WHERE service=? AND release=?",
            (status, status, service, release),
        )

    async def releases(self, service: str) -> list[ReleaseRecord]:
        rows = await self._call(
            self._exec,
            "SELECT body FROM releases WHERE service=? ORDER BY COALESCE(last_good_at, '') DESC",
            (service,),
        )
        return [ReleaseRecord.model_validate_json(r[0]) for r in rows]

    async def last_good(self, service: str, exclude: str | None = None) -> ReleaseRecord | None:
        for rec in await self.releases(service):
            if rec.status == "good" and rec.last_good_at and rec.release != exclude:
                return rec
        return None

    # quarantine
    async def quarantine(self, q: Quarantine) -> None:
        await self._call(
            self._exec,
            "INSERT INTO quarantine(service, body) VALUES (?,?) ON CONFLICT(service) DO UPDATE SET body=excluded.body",
            (q.service, q.model_dump_json()),
        )

    async def lift_quarantine(self, service: str, release: str | None = None) -> None:
        """End the service's quarantine (only if it is of ``release``, when given)."""
        if release is None:
            await self._call(self._exec, "DELETE FROM quarantine WHERE service=?", (service,))
        else:
            await self._call(self._exec, "DELETE FROM quarantine WHERE service=? AND json_extract(body, '$.release')=?",
                             (service, release))

    async def quarantined(self) -> dict[str, Quarantine]:
        rows = await self._call(self._exec, "SELECT body FROM quarantine")
        return {q.service: q for q in (Quarantine.model_validate_json(r[0]) for r in rows)}

    # out-of-band services (the older POST /deploy)
    async def save_out_of_band(self, svc: OutOfBandService) -> None:
        await self._call(
            self._exec,
            "INSERT INTO out_of_band(service, body) VALUES (?,?) ON CONFLICT(service) DO UPDATE SET body=excluded.body",
            (svc.service, svc.model_dump_json()),
        )

    async def out_of_band(self) -> dict[str, OutOfBandService]:
        rows = await self._call(self._exec, "SELECT body FROM out_of_band")
        return {s.service: s for s in (OutOfBandService.model_validate_json(r[0]) for r in rows)}

    async def forget_out_of_band(self, service: str) -> None:
        await self._call(self._exec, "DELETE FROM out_of_band WHERE service=?", (service,))
