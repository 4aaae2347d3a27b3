"""The older Deployer's HTTP API, kept exactly: its request, its answers, and the mapping to them.

Callers written for the older Deployer POST /deploy and poll ``GET /deploy/{id}`` until ``completed`` or
``failed``. This module holds that contract as pydantic models and one pure function from deployerd's own job
record (`deployerd.store.Job`, which stays rich and is served on deployerd's own routes) to the older shape:
statuses mapped to the original's words, phases reduced to ``success``/``failed``/``skipped`` with a readable
``details`` string, timestamps to whole seconds, and a rolled-back job reported ``failed`` with an error that
names both the failure and what the rollback did. Nothing here does I/O, so it is tested as data.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployerd.desired import HealthSpec, ServiceSpec
from deployerd.store import PHASES, Job, JobStatus, PhaseRecord, PhaseStatus

LegacyStatus = Literal["pending", "validating", "transferring", "building", "starting", "verifying",
                       "registering", "completed", "failed"]
LegacyPhaseStatus = Literal["success", "failed", "skipped"]

# the status a running job shows while this phase runs (prune phases: their nearest counterpart)
RUNNING_STATUS: dict[str, LegacyStatus] = {
    **dict(zip(PHASES, ("validating", "transferring", "building", "starting", "verifying", "registering"),
               strict=True)),
    "Stop and Remove": "starting",
    "Deregister": "registering",
}

# the ServiceSpec field a request field becomes: a refusal names the field the caller sent
REQUEST_FIELD = {"name": "service_name", "port": "service_port", "method": "deployment_method",
                 "env": "environment_vars", "register": "auto_register", "source": "service_path",
                 "droplet_id": "droplet_id", "host": "host", "health": "health_path", "path": "health_path"}


class DeployRequest(BaseModel):
    """``POST /deploy``: the original's fields, exactly, plus two optional ones of deployerd's own.

    A field it does not know is refused (422 naming it): dropping it silently lost callers' configuration.
    """

    model_config = ConfigDict(extra="forbid")

    service_path: str
    service_name: str
    service_port: int = Field(ge=1, le=65535)
    droplet_id: int | None = None  # absent: the Registry assigns one
    deployment_method: Literal["docker", "systemd", "manual"] = "docker"
    environment_vars: dict[str, str] = Field(default_factory=dict)  # the service's env; values never logged
    auto_register: bool = True
    verification_job_id: str | None = None
    # deployerd's own (an older caller never sends them): which hosts.yaml host, and the health check's path
    host: str | None = None
    health_path: str = "/health"

    def record(self) -> dict[str, Any]:
        """What the job keeps of the request: everything as sent, but env var names only (no values)."""
        return {**self.model_dump(exclude={"environment_vars"}), "environment_vars": sorted(self.environment_vars)}


class Refused(Exception):
    """A request deployerd cannot honour: 422, naming the request field."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in errors))
        self.errors = errors

    @classmethod
    def field(cls, name: str, msg: str) -> Refused:
        return cls([{"loc": ["body", name], "msg": msg, "type": "value_error"}])


MANUAL_REFUSED = ("'manual' is not supported: deployerd only deploys what it runs itself (docker or systemd), "
                  "so that it can verify, heal and roll it back; run the service yourself and register it with "
                  "the Registry, or send docker or systemd")


def service_spec(req: DeployRequest, host: str, source: str) -> ServiceSpec:
    """The request as a service spec (``source``: its folder relative to the API source directory).
    Raises Refused naming the request's own fields (``environment_vars``, not the spec's ``env``)."""
    if req.deployment_method == "manual":
        raise Refused.field("deployment_method", MANUAL_REFUSED)
    try:
        return ServiceSpec(
            name=req.service_name, droplet_id=req.droplet_id, host=host, method=req.deployment_method,
            port=req.service_port, source=source, health=HealthSpec(path=req.health_path),
            env=req.environment_vars, register=req.auto_register,
        )
    except ValidationError as e:  # no "input" in what is answered: it may be an env value
        raise Refused([{"loc": _request_loc(err["loc"]), "msg": err["msg"], "type": err["type"]}
                       for err in e.errors()]) from None


def _request_loc(loc: tuple[int | str, ...]) -> list[int | str]:
    return ["body", REQUEST_FIELD.get(str(loc[0]), str(loc[0])), *loc[1:]] if loc else ["body"]


class DeployCreated(BaseModel):
    deploy_job_id: str
    service_name: str
    status: LegacyStatus
    created_at: str


class LegacyPhase(BaseModel):
    phase: str
    status: LegacyPhaseStatus
    started_at: str | None
    completed_at: str | None
    duration_seconds: int | None
    details: str
    error: str | None


class Registration(BaseModel):
    droplet_id: int
    service_name: str
    endpoint: str
    registered_at: str


class LegacyJob(BaseModel):
    """``GET /deploy/{job_id}``."""

    deploy_job_id: str
    service_name: str
    service_path: str | None
    status: LegacyStatus
    droplet_id: int | None
    service_port: int | None
    service_url: str | None
    phases: list[LegacyPhase]
    registration: Registration | None
    started_at: str | None
    completed_at: str | None
    duration_seconds: int | None
    success: bool
    error: str | None


class LegacyRollout(LegacyJob):
    """``GET /deploy/{job_id}`` of a fleet's rollout: the older shape plus its per-host jobs and waves (a
    one-host service's job never has these keys)."""

    children: list[str]
    waves: list[list[str]]


# --------------------------------------------------------------------------- the mapping


def seconds(ts: str | None) -> str | None:
    """``2025-01-14T10:00:00.123456Z`` -> ``2025-01-14T10:00:00Z``, the original's precision."""
    if ts is None or len(ts) < 19:
        return ts
    return ts[:19] + "Z"


def _whole(value: float | None) -> int | None:
    return None if value is None else int(round(value))


def job_status(job: Job) -> LegacyStatus:
    """A finished job is ``completed`` or ``failed``; a running one names the phase it is in (or about to run)."""
    if job.status is JobStatus.SUCCEEDED:
        return "completed"
    if job.status.finished:
        return "failed"  # failed, rolled back, interrupted, superseded
    if job.status is JobStatus.PENDING:
        return "pending"
    current = next((p for p in job.phases if p.status is PhaseStatus.RUNNING), None)
    current = current or next((p for p in job.phases if p.status is PhaseStatus.PENDING), None)
    return RUNNING_STATUS.get(current.phase, "validating") if current else "validating"


def job_error(job: Job) -> str | None:
    """The failure, and for a deploy that failed after its build began, what the rollback did."""
    if job.status is JobStatus.SUCCEEDED or not job.status.finished:
        return None
    error = job.error or f"job {job.status.value}"
    rb = job.rollback
    if job.status is JobStatus.ROLLED_BACK and rb:
        return f"{error}; rolled back to release {rb.get('release')}, which serves again"
    if rb and rb.get("error"):
        return f"{error}; rollback to release {rb.get('release')} failed: {rb['error']}"
    if rb:
        return f"{error}; not rolled back: {rb.get('reason') or 'no earlier good release'}"
    if job.transient:
        return f"{error}; not rolled back (host or Registry unreachable): the next reconcile retries"
    return error


def _success_details(job: Job, rec: PhaseRecord) -> str:
    d = rec.details
    docker = job.method == "docker"
    if rec.phase == "Validation":
        return "Service files validated"
    if rec.phase == "Transfer":
        return f"Files transferred to {job.service_path}" if job.service_path else "Files transferred"
    if rec.phase == "Build":
        if docker and d.get("image"):
            return f"Docker image built: {d['image']}"
        return f"Virtual environment built: {d['venv']}" if d.get("venv") else "Build completed"
    if rec.phase == "Start Service":
        if docker:
            return "Docker container started"
        return f"systemd unit started: {d['unit']}" if d.get("unit") else "systemd unit started"
    if rec.phase == "Verify Health":
        return "Service is healthy"
    if rec.phase == "Register with Registry":
        droplet = d.get("droplet_id") or (job.registration or {}).get("droplet_id")
        return f"Registered as Droplet #{droplet}" if droplet is not None else "Registered"
    if rec.phase == "Stop and Remove":
        return "Service stopped and removed"
    if rec.phase == "Deregister":
        return "Removed from the Registry"
    return f"{rec.phase} done"


def phase_details(job: Job, rec: PhaseRecord) -> str:
    """One readable line for a phase, as the original wrote them (``Docker image built: name:tag``)."""
    if rec.status is PhaseStatus.SKIPPED:
        if rec.phase == "Register with Registry" and (job.request or {}).get("auto_register") is False:
            return "Skipped: auto_register is false"
        why = rec.details.get("skipped")
        return f"Skipped: {why}" if why else "Skipped"
    if rec.status is PhaseStatus.FAILED:
        return f"{rec.phase} failed"
    if rec.status is PhaseStatus.SUCCEEDED:
        return _success_details(job, rec)
    return f"Not run: {job_error(job) or 'the job ended before this phase'}"


def _phase(job: Job, rec: PhaseRecord) -> LegacyPhase:
    status: LegacyPhaseStatus = {PhaseStatus.SUCCEEDED: "success", PhaseStatus.FAILED: "failed"}.get(
        rec.status, "skipped")  # type: ignore[assignment]
    if rec.status is PhaseStatus.RUNNING:  # only on a finished job (a store from before interrupted marking)
        status = "failed"
    return LegacyPhase(phase=rec.phase, status=status, started_at=seconds(rec.started_at),
                       completed_at=seconds(rec.completed_at), duration_seconds=_whole(rec.duration_seconds),
                       details=phase_details(job, rec), error=rec.error)


def legacy_job(job: Job) -> LegacyJob:
    """``job`` in the original's shape. A running job lists the phases that ended (its status names the one that
    runs); a finished one lists every phase, those it never reached ``skipped``."""
    finished = job.status.finished
    phases = [_phase(job, p) for p in job.phases
              if finished or p.status in (PhaseStatus.SUCCEEDED, PhaseStatus.FAILED, PhaseStatus.SKIPPED)]
    register = next((p for p in job.phases if p.phase == "Register with Registry"), None)
    registration = None
    if job.registration and register is not None and register.status is PhaseStatus.SUCCEEDED:
        registration = Registration(**{**job.registration,
                                       "registered_at": seconds(job.registration.get("registered_at"))})
    request = job.request or {}
    status = job_status(job)
    shape: type[LegacyJob] = LegacyJob
    extra: dict[str, Any] = {}
    if job.kind == "rollout":
        shape, extra = LegacyRollout, {"children": job.children, "waves": job.waves}
    return shape(
        deploy_job_id=job.id,
        service_name=job.service,
        service_path=request.get("service_path", job.service_path),
        status=status,
        droplet_id=registration.droplet_id if registration else job.droplet_id,
        service_port=job.service_port,
        service_url=job.service_url,
        phases=phases,
        registration=registration,
        started_at=seconds(job.started_at),
        completed_at=seconds(job.completed_at),
        duration_seconds=_whole(job.duration_seconds),
        success=status == "completed",
        error=job_error(job),
        **extra,
    )


def created(job: Job) -> DeployCreated:
    """The answer to ``POST /deploy``."""
    return DeployCreated(deploy_job_id=job.id, service_name=job.service, status=job_status(job),
                         created_at=seconds(job.created_at) or job.created_at)
