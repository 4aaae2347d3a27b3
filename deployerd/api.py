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
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict

from deployerd import __version__, legacy
from deployerd.audit import parse_since, read_file
from deployerd.engine import Conflict, Engine
from deployerd.store import Job
from deployerd.udc import CountRequests, RequestStats, iso_now, udc_router
from deployerd.ui import ui_router
from deployerd.webhook import WebhookError, WebhookEvent, verify_webhook

WEBHOOK_MAX_BYTES = 1 << 20


class SyncRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service: str | None = None
    force: bool = False
    prune_all: bool = False  # a commit that removes every service prunes them (the empty-state guard lets it)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 naming each field, without echoing what was sent (it may hold an env value or a token)."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for err in exc.errors():
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown field {err['loc'][-1]!r}: not part of this request (see the API documentation)"
        errors.append({"loc": list(err["loc"]), "msg": msg, "type": err["type"]})
    return JSONResponse({"detail": errors}, status_code=422)


def _is_dir_under(path: str, root: Path) -> Path | None:
    """``path`` resolved, when it is a directory strictly under ``root`` (blocking: run in a thread)."""
    try:
        source = Path(path).resolve()
    except (ValueError, OSError):  # a NUL byte, a symlink loop
        return None
    return source if source.is_relative_to(root) and source != root and source.is_dir() else None


def create_app(engine: Engine) -> FastAPI:
    settings = engine.settings
    # /docs serves Swagger UI's own files from the package (fastapi-offline): no CDN, so it renders offline
    app: FastAPI = FastAPIOffline(title="deployerd", version=__version__, redoc_url=None)
    app.add_exception_handler(RequestValidationError, _validation_error)
    stats = RequestStats()
    app.add_middleware(CountRequests, stats=stats)
    # a declared security scheme: the OpenAPI document says which routes need the token, and /docs can send it
    bearer = HTTPBearer(auto_error=False, scheme_name="api_token",
                        description="the daemon's API token (the contents of api_token_file)")

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        token = settings.secret("api_token")
        if token is None:
            raise HTTPException(403, "no API token is configured (api_token_file): write routes are disabled")
        given = credentials.credentials.strip() if credentials else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong API token", headers={"WWW-Authenticate": "Bearer"})

    guard = [Depends(require_token)]

    def known(name: str) -> bool:
        """Named by git (valid or not) or seen running at the last look."""
        desired = engine.desired
        return name in engine.services or (desired is not None and (name in desired.services
                                                                       or name in desired.broken))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        detail = engine.health()
        status = {"active": "active", "starting": "inactive"}.get(detail["status"], "error")
        return {"status": status, "service": "deployerd", "version": __version__, "timestamp": iso_now(), **{
            k: v for k, v in detail.items() if k != "status"}, "state": detail["status"]}

    @app.get("/metrics", tags=["observe"])
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/services", tags=["observe"])
    async def services() -> dict[str, Any]:
        rows = [s.__dict__ for s in sorted(engine.services.values(), key=lambda s: s.name)]
        return {"services": rows, "revision": engine.source.revision, "total": len(rows)}

    @app.get("/services/{name}", tags=["observe"])
    async def service(name: str) -> dict[str, Any]:
        status = engine.services.get(name)
        if status is None:
            raise HTTPException(404, f"no service named {name!r}")
        jobs = await engine.store.jobs(name, limit=1)
        return {**status.__dict__, "last_job": jobs[0].model_dump(mode="json") if jobs else None}

    @app.get("/services/{name}/history", tags=["observe"])
    async def history(name: str, limit: int = Query(20, ge=1)) -> dict[str, Any]:
        jobs = await engine.store.jobs(name, limit=min(limit, 200))
        releases = await engine.store.releases(name)
        quarantine = (await engine.store.quarantined()).get(name)
        if not (jobs or releases or quarantine or known(name)):  # a pruned service keeps its history
            raise HTTPException(404, f"no service named {name!r} (not in git, not running, no history)")
        return {
            "service": name,
            "jobs": [j.model_dump(mode="json") for j in jobs],
            "releases": [r.model_dump(exclude={"spec"}) for r in releases],
            "quarantine": quarantine.model_dump() if quarantine else None,
        }

    @app.get("/audit", dependencies=guard, tags=["observe"])
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

    @app.get("/jobs/{job_id}", tags=["observe"])
    async def get_rich_job(job_id: str) -> dict[str, Any]:
        """deployerd's own record of a job: rich statuses, structured phase details, rollback, logs."""
        return (await _job(job_id)).model_dump(mode="json")

    @app.get("/deploy/{job_id}", response_model=legacy.LegacyRollout | legacy.LegacyJob, tags=["older API"])
    async def get_job(job_id: str) -> legacy.LegacyJob:
        """The older Deployer's shape, exactly (`deployerd.legacy`); a fleet's rollout adds children and waves."""
        return legacy.legacy_job(await _job(job_id))

    async def _job(job_id: str) -> Job:
        job = await engine.store.job(job_id)
        if job is None:
            raise HTTPException(404, f"no deploy job {job_id!r}")
        return job

    @app.post("/deploy", dependencies=guard, status_code=202, response_model=legacy.DeployCreated, tags=["older API"])
    async def post_deploy(req: legacy.DeployRequest) -> legacy.DeployCreated:
        """The older ``POST /deploy``: a directory under the API source directory, deployed out of band."""
        root = await asyncio.to_thread(settings.api_source_root.resolve)
        source = await asyncio.to_thread(_is_dir_under, req.service_path, root)
        desired = engine.desired
        host = req.host or (sorted(desired.hosts)[0] if desired and desired.hosts else None)
        try:
            if source is None:
                raise legacy.Refused.field(
                    "service_path", f"must be a directory under the API source directory {root} (api_source_dir)")
            if host is None:
                raise Conflict("no host known yet: hosts.yaml has not been loaded")
            spec = legacy.service_spec(req, host, source.relative_to(root).as_posix())
            job = await engine.deploy_out_of_band(spec, root, request=req.record())
        except legacy.Refused as e:
            raise HTTPException(422, e.errors) from e
        except Conflict as e:
            raise HTTPException(409, str(e)) from e
        except ValueError as e:  # the source folder breaks a manifest rule (a symlink out of it, a size limit)
            raise HTTPException(422, legacy.Refused.field("service_path", str(e)).errors) from e
        return legacy.created(job)

    @app.delete("/deploy/services/{name}", dependencies=guard, status_code=202, response_model=legacy.DeployCreated,
                tags=["older API"])
    async def remove_service(name: str) -> legacy.DeployCreated:
        """Remove an out-of-band service (instances, artifacts, files, its Registry entry); poll the job."""
        try:
            job = await engine.remove_out_of_band(name)
        except KeyError as e:
            raise HTTPException(404, str(e.args[0])) from e
        except Conflict as e:
            raise HTTPException(409, str(e)) from e
        return legacy.created(job)

    @app.post("/sync", dependencies=guard, tags=["control"])
    async def sync(req: SyncRequest | None = None) -> dict[str, Any]:
        req = req or SyncRequest()
        force = ({req.service} if req.service else set()) if req.force else None
        actions = await engine.reconcile([f"sync {req.service or 'all'}"], force=force, prune_all=req.prune_all)
        if req.service:
            actions = [a for a in actions if a.service == req.service]
            if not actions and not known(req.service):
                raise HTTPException(404, f"no service named {req.service!r} (not in git, not running)")
        return {"revision": engine.source.revision, "actions": [a.model_dump(mode="json") for a in actions]}

    @app.post("/webhook", tags=["control"])
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
        if isinstance(push, WebhookEvent):  # GitHub's ping when the hook is added, or another event: not a push
            return {"accepted": False, "reason": f"{push.provider} {push.event} event: nothing to fetch"}
        if push.branch != settings.branch:
            return {"accepted": False, "reason": f"push to {push.branch}, watching {settings.branch}"}
        engine.kick.set(f"webhook {push.provider}")
        return {"accepted": True, "after": push.after}

    app.include_router(ui_router(engine, engine.events))
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
