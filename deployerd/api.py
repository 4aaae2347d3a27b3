"""The daemon's HTTP surface: health, metrics, services, jobs, audit, sync, webhook, and the older deploy API.

Reads are open, except the audit trail (it names people and quotes commit messages); every route that changes
anything needs the API token (``Authorization: Bearer``). With no token configured those routes are refused
outright rather than left open. ``/health`` is computed from
what the loop last saw and never waits on a remote call.
"""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployerd import __version__
from deployerd.audit import parse_since, read_file
from deployerd.desired import HealthSpec, ServiceSpec
from deployerd.engine import Conflict, Engine
from deployerd.store import Job, JobStatus
from deployerd.udc import CountRequests, RequestStats, iso_now, udc_router
from deployerd.webhook import WebhookError, verify_webhook

WEBHOOK_MAX_BYTES = 1 << 20


class DeployRequest(BaseModel):
    """The older Deployer's ``POST /deploy`` body; unknown fields from older callers are ignored."""

    model_config = ConfigDict(extra="ignore")

    service_name: str
    service_path: str
    service_port: int = Field(ge=1, le=65535)
    droplet_id: int | None = None
    deployment_method: Literal["docker", "systemd"] = "docker"
    host: str | None = None
    health_path: str = "/health"
    env: dict[str, str] = Field(default_factory=dict)


class SyncRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service: str | None = None
    force: bool = False


def legacy_job(job: Job) -> dict[str, Any]:
    """A job in the older ``GET /deploy/{job_id}`` shape (plus our own fields, which older callers ignore)."""
    return {
        "deploy_job_id": job.id,
        "service_name": job.service,
        "service_path": job.service_path,
        "status": job.status.value,
        "droplet_id": job.droplet_id,
        "service_port": job.service_port,
        "service_url": job.service_url,
        "phases": [
            {"phase": p.phase, "status": p.status.value, "duration_seconds": p.duration_seconds,
             "details": p.details, "error": p.error}
            for p in job.phases
        ],
        "registration": job.registration,
        "started_at": job.started_at,
        "completed_at": job.completed_at,
        "duration_seconds": job.duration_seconds,
        "success": job.status is JobStatus.SUCCEEDED,
        "release": job.release,
        "commit": job.commit,
        "reasons": job.reasons,
        "error": job.error,
        "rollback": job.rollback,
        "logs": job.logs,
        "trigger": job.trigger,
    }


def create_app(engine: Engine) -> FastAPI:
    settings = engine.settings
    app = FastAPI(title="deployerd", version=__version__)
    stats = RequestStats()
    app.add_middleware(CountRequests, stats=stats)

    def require_token(authorization: str | None = Header(default=None)) -> None:
        token = settings.secret("api_token")
        if token is None:
            raise HTTPException(403, "no API token is configured (api_token_file): write routes are disabled")
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong API token", headers={"WWW-Authenticate": "Bearer"})

    guard = [Depends(require_token)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        detail = engine.health()
        status = {"active": "active", "starting": "inactive"}.get(detail["status"], "error")
        return {"status": status, "service": "deployerd", "version": __version__, "timestamp": iso_now(), **{
            k: v for k, v in detail.items() if k != "status"}, "state": detail["status"]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/services")
    async def services() -> dict[str, Any]:
        rows = [s.__dict__ for s in sorted(engine.services.values(), key=lambda s: s.name)]
        return {"services": rows, "revision": engine.source.revision, "total": len(rows)}

    @app.get("/services/{name}")
    async def service(name: str) -> dict[str, Any]:
        status = engine.services.get(name)
        if status is None:
            raise HTTPException(404, f"no service named {name!r}")
        jobs = await engine.store.jobs(name, limit=1)
        return {**status.__dict__, "last_job": legacy_job(jobs[0]) if jobs else None}

    @app.get("/services/{name}/history")
    async def history(name: str, limit: int = Query(20, ge=1)) -> dict[str, Any]:
        jobs = await engine.store.jobs(name, limit=min(limit, 200))
        releases = await engine.store.releases(name)
        quarantine = (await engine.store.quarantined()).get(name)
        return {
            "service": name,
            "jobs": [legacy_job(j) for j in jobs],
            "releases": [r.model_dump(exclude={"spec"}) for r in releases],
            "quarantine": quarantine.model_dump() if quarantine else None,
        }

    @app.get("/audit", dependencies=guard)
    async def audit(service: str | None = None, since: str | None = None,
                    limit: int = Query(1000, ge=1, le=10000)) -> dict[str, Any]:
        """The audit trail, oldest first (the last ``limit``). Read-only, yet behind the token: it names commit
        authors with their e-mail addresses and holds commit messages and errors."""
        try:
            when = parse_since(since) if since else None
        except ValueError as e:
            raise HTTPException(422, str(e)) from e
        records, bad = await asyncio.to_thread(read_file, settings.audit_path, service, when)
        return {"records": [r.model_dump() for r in records[-limit:]], "unreadable_lines": bad}

    @app.get("/deploy/{job_id}")
    async def get_job(job_id: str) -> dict[str, Any]:
        job = await engine.store.job(job_id)
        if job is None:
            raise HTTPException(404, f"no deploy job {job_id!r}")
        return legacy_job(job)

    @app.post("/deploy", dependencies=guard, status_code=202)
    async def post_deploy(req: DeployRequest) -> dict[str, Any]:
        root = settings.api_source_root.resolve()
        source = Path(req.service_path).resolve()
        if not source.is_relative_to(root) or source == root or not source.is_dir():
            raise HTTPException(422, f"service_path must be a directory under {root}")
        desired = engine.desired
        host = req.host or (sorted(desired.hosts)[0] if desired and desired.hosts else None)
        if host is None:
            raise HTTPException(409, "no host known yet: hosts.yaml has not been loaded")
        try:
            spec = ServiceSpec(
                name=req.service_name, droplet_id=req.droplet_id, host=host, method=req.deployment_method,
                port=req.service_port, source=source.relative_to(root).as_posix(),
                health=HealthSpec(path=req.health_path), env=req.env,
            )
        except ValidationError as e:
            raise HTTPException(422, [{"loc": err["loc"], "msg": err["msg"]} for err in e.errors()]) from e
        try:
            job = await engine.deploy_out_of_band(spec, root)
        except Conflict as e:
            raise HTTPException(409, str(e)) from e
        except ValueError as e:
            raise HTTPException(422, str(e)) from e
        return {"deploy_job_id": job.id, "service_name": job.service, "status": job.status.value,
                "created_at": job.created_at}

    @app.post("/sync", dependencies=guard)
    async def sync(req: SyncRequest | None = None) -> dict[str, Any]:
        req = req or SyncRequest()
        force = ({req.service} if req.service else set()) if req.force else None
        actions = await engine.reconcile([f"sync {req.service or 'all'}"], force=force)
        if req.service:
            actions = [a for a in actions if a.service == req.service]
        return {"revision": engine.source.revision, "actions": [a.model_dump(mode="json") for a in actions]}

    @app.post("/webhook")
    async def webhook(request: Request) -> dict[str, Any]:
        secret = settings.secret("webhook_secret")
        if secret is None:
            raise HTTPException(403, "no webhook secret is configured (webhook_secret_file)")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > WEBHOOK_MAX_BYTES:
            raise HTTPException(413, "body too large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > WEBHOOK_MAX_BYTES:
                raise HTTPException(413, "body too large")
        try:
            push = verify_webhook(request.headers, bytes(body), secret, max_bytes=WEBHOOK_MAX_BYTES)
        except WebhookError as e:
            raise HTTPException(e.status_code, e.reason) from e
        if push.branch != settings.branch:
            return {"accepted": False, "reason": f"push to {push.branch}, watching {settings.branch}"}
        engine.kick.set(f"webhook {push.provider}")
        return {"accepted": True, "after": push.after}

    app.include_router(udc_router(
        "deployerd", __version__, ["gitops", "docker", "rollback", "webhook", "metrics"],
        dependency_names=["git", "registry", "hosts"],
        dependencies=lambda: _dependencies(engine),
        write_dependency=require_token,
        stats=stats,
    ))
    return app


def _dependencies(engine: Engine) -> dict[str, Any]:
    h = engine.health()
    required = [{"name": "git", "status": "error" if h["git"]["error"] else "active"}]
    required.append({"name": "registry", "status": "active" if h["registry"]["reachable"] else "error"})
    required += [{"name": f"host:{n}", "status": "active" if v["reachable"] else "error"}
                 for n, v in h["hosts"].items()]
    return {"required": required, "optional": [], "missing": [r["name"] for r in required if r["status"] != "active"]}
