"""The status read model: each service's sync and health state, and what ``/health`` says about the daemon.

Computed from what the last reconcile saw (its ``Snapshot``) and the jobs in flight, never from a remote
call, so ``GET /services`` and ``/health`` answer at once whatever the hosts do. Sync and health states are
Argo CD's: sync compares desired with observed, health says whether what runs serves.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from deployerd.desired import DesiredState, endpoint_url
from deployerd.jobqueue import Failing
from deployerd.liveness import Probe
from deployerd.observe import HostDown
from deployerd.observed import ObservedState, RunState
from deployerd.plan import Action, ActionKind
from deployerd.runtimes import RUNTIMES
from deployerd.snapshot import Snapshot
from deployerd.source import GitSource


class SyncState(StrEnum):
    SYNCED = "Synced"  # what runs is what git wants
    OUT_OF_SYNC = "OutOfSync"  # an action is planned
    UNKNOWN = "Unknown"  # its host could not be read (or it is not git's: out-of-band)


class HealthState(StrEnum):
    HEALTHY = "Healthy"
    PROGRESSING = "Progressing"  # a job is running for it
    DEGRADED = "Degraded"  # it exists but does not run, or fails its health probe
    MISSING = "Missing"  # nothing of it runs on its host
    UNKNOWN = "Unknown"  # its host could not be read


@dataclass
class ServiceStatus:
    name: str
    host: str
    method: str
    managed_by: str
    sync_status: SyncState
    health_status: HealthState
    release: str | None  # desired
    running_release: str | None
    commit: str | None
    reasons: list[str] = field(default_factory=list)
    url: str | None = None
    last_job: str | None = None
    health_checked_at: str | None = None  # when its health probe last ran against the running release
    health_detail: str | None = None  # what the probe answered then
    health_checked_ts: float | None = None  # the same, seconds since the epoch
    healing: str | None = None  # the flap guard holds its heals back (heal.Healer): why, and until when
    # a fleet: each host's own row ({host, release, running_release, sync_status, health_status, reasons})
    hosts: list[dict[str, Any]] = field(default_factory=list)

    def metric_row(self) -> dict[str, str]:
        """Its ``deployerd_service_info`` labels (and ``health_checked_at``: seconds since the epoch, or "")."""
        return {"service": self.name, "host": self.host, "method": self.method, "sync_status": self.sync_status,
                "health_status": self.health_status, "release": self.running_release or "",
                "commit": (self.commit or "")[:12],
                "health_checked_at": "" if self.health_checked_ts is None else f"{self.health_checked_ts:.3f}"}


@dataclass
class ReconcileRecord:
    at: str
    revision: str | None
    trigger: list[str]
    duration_s: float
    actions: int
    error: str | None = None
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage: where a slow reconcile waits


class Board:
    """Each service's status, kept from reconcile to reconcile (a service's last job survives a re-plan)."""

    def __init__(self) -> None:
        self.services: dict[str, ServiceStatus] = {}
        self.last_reconcile: ReconcileRecord | None = None
        self._rows: list[dict[str, str]] = []
        self._notes: dict[str, str] = {}  # service -> what the flap guard says of it

    def note(self, service: str, text: str | None) -> None:
        """The flap guard's word on ``service`` (None: nothing to say), shown now and by every later update."""
        if text is None:
            self._notes.pop(service, None)
        else:
            self._notes[service] = text
        status = self.services.get(service)
        if status is not None:
            status.reasons = [r for r in status.reasons if r != status.healing]
            status.healing = text
            if text is not None:
                status.reasons.append(text)

    def update(self, snap: Snapshot, busy: Collection[str], probes: Mapping[str, Probe] | None = None) -> None:
        """The statuses of what ``snap`` saw and planned; ``busy`` names the services with a job in flight;
        ``probes``, each service's last health probe (a running release is Healthy only if its probe passed)."""
        rows: dict[str, ServiceStatus] = {}
        fleets: dict[str, list[ServiceStatus]] = {}
        for a in snap.actions:
            row = self._row(snap, a, busy, probes or {})
            spec = snap.desired.services.get(a.service)
            if spec is not None and spec.fleet:
                fleets.setdefault(a.service, []).append(row)
            else:
                rows[a.service] = row
        for name, per_host in fleets.items():
            rows[name] = _fleet_row(per_host, snap.desired.services[name].fleet)
        for name, facts in snap.observed.hosts.items():
            for inst in facts.instances:
                if inst.managed_by == "api" and inst.current and inst.service not in rows:
                    running = inst.state is RunState.RUNNING
                    rows[inst.service] = ServiceStatus(
                        name=inst.service, host=name, method=inst.method, managed_by="api",
                        sync_status=SyncState.UNKNOWN,
                        health_status=HealthState.HEALTHY if running else HealthState.DEGRADED,
                        release=inst.release, running_release=inst.release, commit=None,
                        reasons=["deployed out of band (POST /deploy)"],
                    )
        self.services = rows
        self._rows = [r.metric_row() for r in rows.values()]

    def metric_rows(self) -> list[dict[str, str]]:
        """The ``deployerd_service_info`` rows of the last update (read when metrics are scraped)."""
        return self._rows

    def job_ended(self, service: str, job_id: str) -> None:
        """Remember a finished job as the service's last (a superseded or transient one is not shown)."""
        status = self.services.get(service)
        if status is not None:
            status.last_job = job_id

    def _row(self, snap: Snapshot, a: Action, busy: Collection[str], probes: Mapping[str, Probe]) -> ServiceStatus:
        oob = snap.out_of_band_context(a)
        spec = oob.spec if oob else snap.desired.services.get(a.service)
        facts = snap.observed.hosts.get(a.host)
        method = spec.method if spec else None
        # reachable: its host, and the runtime its service uses there, answered (a silent Docker: only its own)
        reachable = facts is not None and facts.reachable and (method is None or facts.unknown(method) is None)
        inst = facts.current(a.service) if facts is not None and reachable else None
        if a.kind is ActionKind.NOOP:
            sync = SyncState.SYNCED
        else:
            sync = SyncState.OUT_OF_SYNC if reachable else SyncState.UNKNOWN
        if not reachable:
            health = HealthState.UNKNOWN
        elif a.service in busy:
            health = HealthState.PROGRESSING
        elif inst is None:
            health = HealthState.MISSING
        elif inst.state is RunState.RUNNING and inst.healthy is not False:
            health = HealthState.HEALTHY
        else:
            health = HealthState.DEGRADED
        probe = probes.get(a.service)
        if probe is not None and (inst is None or probe.release != inst.release):
            probe = None  # it checked another release
        reasons = list(a.reasons)
        healing = self._notes.get(a.service)
        if healing is not None:
            reasons.append(healing)
        if probe is not None and not probe.passed and health is HealthState.HEALTHY:
            health = HealthState.DEGRADED
            reasons.append(f"health probe failed at {probe.checked_at}: {probe.detail}")
        host = snap.desired.hosts.get(a.host)
        prev = self.services.get(a.service)
        return ServiceStatus(
            name=a.service, host=a.host, method=spec.method if spec else (inst.method if inst else "docker"),
            managed_by="api" if oob else "git", sync_status=sync, health_status=health, release=a.release,
            running_release=inst.release if inst else None, commit=inst.commit if inst else None,
            reasons=reasons, url=endpoint_url(host, spec.port) if spec and host else None,
            last_job=prev.last_job if prev else None,
            health_checked_at=probe.checked_at if probe else None, health_detail=probe.detail if probe else None,
            health_checked_ts=probe.checked_ts if probe else None, healing=healing,
        )


_WORST = (HealthState.PROGRESSING, HealthState.DEGRADED, HealthState.MISSING, HealthState.UNKNOWN,
          HealthState.HEALTHY)


def _fleet_row(per_host: list[ServiceStatus], fleet: list[str]) -> ServiceStatus:
    """A fleet service's status: its first host's row, synced only when every host is, the worst health of
    them (a job in flight: Progressing), and every host's own row in ``hosts`` (fleet order, then any other)."""
    order = {h: i for i, h in enumerate(fleet)}
    per_host = sorted(per_host, key=lambda r: (order.get(r.host, len(order)), r.host))
    syncs = {r.sync_status for r in per_host}
    sync = next((s for s in (SyncState.OUT_OF_SYNC, SyncState.UNKNOWN) if s in syncs), SyncState.SYNCED)
    healths = {r.health_status for r in per_host}
    health_ = next(h for h in _WORST if h in healths or h is HealthState.HEALTHY)
    first = per_host[0]
    reasons = list(dict.fromkeys(f"{r.host}: {why}" for r in per_host for why in r.reasons
                                 if not (why == "in sync" and r.sync_status is SyncState.SYNCED)))
    hosts = [{"host": r.host, "release": r.release, "running_release": r.running_release,
              "sync_status": r.sync_status, "health_status": r.health_status, "reasons": r.reasons, "url": r.url}
             for r in per_host]
    return dataclasses.replace(first, sync_status=sync, health_status=health_, reasons=reasons, hosts=hosts)


def paused(board: Board) -> list[str]:
    """The fleets' rollouts that wait for a host to answer again (the planner's BLOCKED reasons)."""
    return sorted({f"service {s.name}: {why}" for s in board.services.values() for h in s.hosts
                   for why in h["reasons"] if why.startswith("rollout paused")})


def health(
    *, board: Board, desired: DesiredState | None, observed: ObservedState | None, source: GitSource, branch: str,
    registry_url: str,
    hosts_down: Mapping[str, HostDown], failing: Mapping[str, Failing], in_flight: Collection[str],
    started_at: float,
) -> dict[str, Any]:
    """What /health says: computed from what the loop last saw, never from a remote call."""
    hosts: dict[str, dict[str, Any]] = {}
    if observed is not None:
        hosts = {n: {"reachable": f.reachable, "error": f.error,
                     **({"ingress_error": f.ingress_error} if f.ingress_error else {}),
                     # each runtime: "answering", "not observed" (no service of it here) or why it is silent
                     **({"runtimes": {m: ("not observed" if m in f.unobserved else f.silent.get(m, "answering"))
                                      for m in sorted(RUNTIMES)}} if f.reachable else {})}
                 for n, f in observed.hosts.items()}
    for n, down in hosts_down.items():  # failed hosts are retried backing off: say since when, and when next
        if n in hosts and not hosts[n]["reachable"]:
            hosts[n].update(since=down.since, attempts=down.attempts, last_attempt_at=down.last_attempt_at,
                            next_attempt_in_s=down.retry_in_s)
    registry_ok = observed is not None and observed.registry is not None
    last = board.last_reconcile
    degraded = []
    if source.last_error:
        degraded.append(f"git: {source.last_error}")
    if desired is not None:  # a broken hosts.yaml blocks every service; an invalid manifest blocks its own
        degraded += [f"desired state: {e}" for e in desired.errors]
    for n, h in hosts.items():
        if not h["reachable"]:
            error = str(h["error"])
            line = error if error.startswith(f"host {n}") else f"host {n}: {error}"
            if "attempts" in h:
                line += f" ({h['attempts']} attempts since {h['since']}, next in {h['next_attempt_in_s']:g} s)"
            degraded.append(line)
        for why in (observed.hosts[n].silent.values() if observed is not None and h["reachable"] else ()):
            degraded.append(f"{why} (its services Unknown on {n}; the others reconcile)")
        if h.get("ingress_error"):  # a dead proxy: found by the last observation (which started it again)
            degraded.append(str(h["ingress_error"]))
    if observed is not None and not registry_ok:
        degraded.append(f"registry: {observed.registry_error}")
    if last and last.error:
        degraded.append(f"reconcile: {last.error}")
    degraded += paused(board)
    now = time.monotonic()
    for name, b in sorted(failing.items()):  # e.g. Registrations failing while the Registry lists fine
        if b.transient:
            degraded.append(f"service {name}: {b.failures} failed attempts, next in "
                            f"{b.remaining_s(now):.0f} s: {b.error}")
    return {
        "status": "degraded" if degraded else ("active" if last else "starting"),
        "degraded": degraded,
        "uptime_seconds": int(time.time() - started_at),
        "last_reconcile": last.__dict__ if last else None,
        "git": {"url": source.display_url, "branch": branch, "revision": source.revision,
                "last_fetch_at": source.last_fetch_at.isoformat() if source.last_fetch_at else None,
                "error": source.last_error},
        "hosts": hosts,
        "desired": {"complete": desired.complete, "invalid": sorted(desired.broken),
                    "errors": [str(e) for e in desired.errors]} if desired is not None else None,
        "registry": {"url": registry_url, "reachable": registry_ok,
                     "error": observed.registry_error if observed else None},
        "jobs_in_flight": sorted(in_flight),
    }
