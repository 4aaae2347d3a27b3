"""What the status page shows, read from the engine's last look and the store: never a remote call.

Each page is built from what the loop last observed (``engine.services``, ``engine.observed``, the last
plan), the store (jobs, quarantines, releases) and the local git mirror (commit authors and messages), so
opening or refreshing a page costs the hosts nothing. Views hold names, states, releases, commits and the
store's scrubbed job records: never an env value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from deployerd.source import CommitInfo
from deployerd.store import PHASES, Job, JobStatus, Quarantine

if TYPE_CHECKING:
    from deployerd.engine import Engine, ServiceStatus
    from deployerd.ui.live import LiveJobs

JOBS_SHOWN = 20


@dataclass
class LiveJob:
    """The job running for a service now, as the event stream told it: which phase, how far."""

    job_id: str
    kind: str
    phase: str | None = None

    @property
    def step(self) -> int:
        return PHASES.index(self.phase) + 1 if self.phase in PHASES else 0


@dataclass
class Cell:
    """One service on one host: what should run, what runs, and how it is."""

    service: str
    host: str
    sync: str
    health: str
    release: str | None
    running_release: str | None
    commit: CommitInfo | None
    commit_sha: str | None
    managed_by: str
    url: str | None
    quarantine: Quarantine | None
    job: LiveJob | None
    rollout: str | None = None  # a fleet's: "2 of 5 hosts on <release>"

    @property
    def dom_id(self) -> str:
        return f"cell-{self.service}-{self.host}"


@dataclass
class Row:
    service: str
    cells: list[Cell | None]  # one per host column; None where the service does not run
    errors: list[str] = field(default_factory=list)  # its manifest is invalid: running release left alone

    @property
    def dom_id(self) -> str:
        return f"row-{self.service}"


@dataclass
class Overview:
    hosts: list[str]
    rows: list[Row]
    revision: CommitInfo | None
    revision_sha: str | None
    reconciled_at: str | None
    reconcile_error: str | None
    git_error: str | None


@dataclass
class PlannedStep:
    kind: str
    host: str
    release: str | None
    current_release: str | None
    reasons: list[str]


@dataclass
class ServicePage:
    name: str
    cell: Cell | None
    errors: list[str]
    plan: list[PlannedStep]
    planned_at: str | None
    jobs: list[Job]
    commits: dict[str, CommitInfo]
    releases: list[tuple[str, str, str | None]]  # (release, status, last good at)


@dataclass
class HostRow:
    name: str
    address: str
    reachable: bool | None  # None: not observed yet
    since: str | None
    error: str | None
    attempts: int
    next_attempt_in_s: float | None
    services: int
    round_trips: int
    commands: int
    sftp_ops: int
    api_requests: int
    connects: int
    forwards: int
    failures: int
    proxy: str  # the host's ingress proxy: none, or which and how it was found
    proxy_ok: bool = True

    @property
    def dom_id(self) -> str:
        return f"host-{self.name}"


def _cell(status: ServiceStatus, commits: dict[str, CommitInfo], quarantine: Quarantine | None,
          job: LiveJob | None, rollout: str | None = None) -> Cell:
    return Cell(
        service=status.name, host=status.host, sync=status.sync_status, health=status.health_status,
        release=status.release, running_release=status.running_release,
        commit=commits.get(status.commit or ""), commit_sha=status.commit, managed_by=status.managed_by,
        url=status.url, quarantine=quarantine if quarantine and quarantine.release == status.release else None,
        job=job, rollout=rollout,
    )


def host_rows(status: ServiceStatus) -> list[tuple[ServiceStatus, str | None]]:
    """A service's status on each host it runs on: its own, or each fleet host's with how far the rollout is
    ("2 of 3 hosts on <release>")."""
    if not status.hosts:
        return [(status, None)]
    on = sum(1 for h in status.hosts if h["running_release"] == status.release)
    progress = f"{on} of {len(status.hosts)} hosts on {(status.release or '-')[:12]}"
    return [(dataclasses.replace(status, host=h["host"], sync_status=h["sync_status"], health_status=h["health_status"],
                                release=h["release"], running_release=h["running_release"], url=h["url"],
                                reasons=h["reasons"], hosts=[]), progress) for h in status.hosts]


async def overview(engine: Engine, live: LiveJobs) -> Overview:
    desired, observed = engine.desired, engine.observed
    hosts = sorted(set(desired.hosts if desired else ()) | set(observed.hosts if observed else ()))
    statuses = dict(engine.services)
    hosts += sorted({s.host for s in statuses.values()} - set(hosts))
    revision = engine.source.revision
    commits = await engine.source.commits([revision or "", *(s.commit or "" for s in statuses.values())])
    quarantined = await engine.store.quarantined()
    rows = []
    for name in sorted(set(statuses) | (desired.broken if desired else set())):
        status = statuses.get(name)
        cells: list[Cell | None] = [None] * len(hosts)
        for one, rollout in host_rows(status) if status is not None else []:  # a fleet: a cell on each host
            if one.host in hosts:
                cells[hosts.index(one.host)] = _cell(one, commits, quarantined.get(name), live.get(name), rollout)
        errors = [str(e) for e in desired.errors_for(name)] if desired and name in desired.broken else []
        rows.append(Row(service=name, cells=cells, errors=errors))
    last = engine.last_reconcile
    return Overview(
        hosts=hosts, rows=rows, revision=commits.get(revision or ""), revision_sha=revision,
        reconciled_at=last.at if last else None, reconcile_error=last.error if last else None,
        git_error=engine.source.last_error,
    )


async def service_page(engine: Engine, live: LiveJobs, name: str) -> ServicePage | None:
    """The service's status, its last plan, its jobs and releases; None when nothing knows the name."""
    status = engine.services.get(name)
    jobs = await engine.store.jobs(name, limit=JOBS_SHOWN)
    desired = engine.desired
    broken = desired is not None and name in desired.broken
    if status is None and not jobs and not broken:
        return None
    commits = await engine.source.commits([*(j.commit for j in jobs), (status.commit or "") if status else ""])
    quarantine = (await engine.store.quarantined()).get(name)
    plan = [PlannedStep(kind=a.kind.value, host=a.host, release=a.release, current_release=a.current_release,
                        reasons=list(a.reasons))
            for a in (engine.seen.actions if engine.seen else []) if a.service == name]
    last = engine.last_reconcile
    releases = [(r.release, r.status, r.last_good_at) for r in await engine.store.releases(name)]
    return ServicePage(
        name=name, cell=_cell(status, commits, quarantine, live.get(name)) if status else None,
        errors=[str(e) for e in desired.errors_for(name)] if desired and broken else [],
        plan=plan, planned_at=last.at if last else None, jobs=jobs, commits=commits, releases=releases,
    )


def hosts_page(engine: Engine, live: LiveJobs) -> list[HostRow]:
    desired, observed = engine.desired, engine.observed
    names = sorted(set(desired.hosts if desired else ()) | set(observed.hosts if observed else ()))
    stats = engine.hosts.pool.stats()
    rows = []
    for name in names:
        spec = desired.hosts.get(name) if desired else None
        facts = observed.hosts.get(name) if observed else None
        down = engine.hosts.down.get(name)
        counters = stats.get(name)
        reachable = facts.reachable if facts else None
        ingress = spec.ingress if spec else "none"
        proxy_error = facts.ingress_error if facts and reachable else None
        if ingress == "none":
            proxy = "none"
        elif not reachable:
            proxy = f"{ingress}: not observed"
        else:
            proxy = f"{ingress}: {proxy_error}" if proxy_error else f"{ingress}: serving"
        rows.append(HostRow(
            name=name, address=f"{spec.user}@{spec.address}:{spec.ssh_port}" if spec else "",
            reachable=reachable,
            since=down.since if down and reachable is False else live.up_since.get(name) if reachable else None,
            error=(down.error if down else None) or (facts.error if facts else None) if reachable is False else None,
            attempts=down.attempts if down else 0,
            next_attempt_in_s=down.retry_in_s if down and reachable is False else None,
            services=len({i.service for i in facts.instances}) if facts else 0,
            round_trips=counters.round_trips if counters else 0,
            commands=counters.commands if counters else 0, sftp_ops=counters.sftp_ops if counters else 0,
            api_requests=counters.api_requests if counters else 0, connects=counters.connects if counters else 0,
            forwards=counters.forwards if counters else 0, failures=counters.failures if counters else 0,
            proxy=proxy, proxy_ok=proxy_error is None,
        ))
    return rows


def failed(job: Job) -> bool:
    return job.status in (JobStatus.FAILED, JobStatus.ROLLED_BACK)
