"""The embedded Registry: the ecosystem's droplet catalogue contract, over SQLite, plus its own UDC endpoints.

Routes, status codes and body shapes follow the Registry's contract exactly, so deployerd's
client works against this and the original alike. With a token configured, every write (POST/PATCH/DELETE,
including POST /message) needs ``Authorization: Bearer <token>``; reads stay open for observers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel, Field, model_validator

from deployerd import __version__
from deployerd.registry.store import Conflict, Droplet, DropletStatus, DropletStore
from deployerd.udc import CountRequests, Dependencies, DependencyStatus, RequestStats, Status, iso_now, udc_router

log = logging.getLogger(__name__)

TOKEN_ENV = "DEPLOYERD_REGISTRY_TOKEN"


class DropletCreate(BaseModel):
    id: int | None = Field(default=None, ge=0)  # None or 0: take the next id from the counter
    name: str = Field(min_length=1)
    steward: str | None = None
    endpoint: str = Field(min_length=1)
    metadata: dict[str, Any] | None = None


class DropletPatch(BaseModel):
    """Any subset of the patchable fields; only the fields sent are changed (metadata replaced whole)."""

    status: DropletStatus | None = None
    endpoint: str | None = Field(default=None, min_length=1)
    metadata: dict[str, Any] | None = None
    proof: str | None = None
    cost_usd: float | None = None
    yield_usd: float | None = None

    @model_validator(mode="after")
    def _no_null_for_required(self) -> DropletPatch:
        nulled = [f for f in ("status", "endpoint", "cost_usd", "yield_usd") if f in self.model_fields_set
                  and getattr(self, f) is None]
        if nulled:
            raise ValueError(f"may not be null: {', '.join(nulled)}")
        return self


class DropletResponse(BaseModel):
    droplet: Droplet
    timestamp: str


class DropletList(BaseModel):
    droplets: list[Droplet]
    total: int
    timestamp: str


class Deleted(BaseModel):
    success: bool
    message: str
    deleted_at: str


def require_bearer(token: str | None) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency refusing requests without ``Bearer <token>`` (401); a no-op when token is None.

    Compared in constant time; the token never appears in a response or a log line.
    """
    expected = token.encode() if token else None

    async def check(authorization: str | None = Header(default=None)) -> None:
        if expected is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    return check


def _not_found(droplet: str) -> HTTPException:
    return HTTPException(404, f"droplet {droplet} not found")


def create_app(db_path: Path, token: str | None) -> FastAPI:
    """The Registry app over the SQLite file ``db_path`` (created if absent); ``token`` guards writes."""
    store = DropletStore(Path(db_path))
    stats = RequestStats()
    guard = [Depends(require_bearer(token))]

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        store.close()

    app = FastAPI(title="deployerd registry", version=__version__, lifespan=lifespan)
    app.add_middleware(CountRequests, stats=stats)

    @app.post("/droplets", status_code=201, response_model=DropletResponse, dependencies=guard)
    async def create(body: DropletCreate) -> DropletResponse:
        try:
            droplet = await store.create(
                body.name, body.endpoint, droplet_id=body.id, steward=body.steward, metadata=body.metadata
            )
        except Conflict as exc:
            raise HTTPException(409, str(exc)) from None
        return DropletResponse(droplet=droplet, timestamp=iso_now())

    @app.get("/droplets", response_model=DropletList)
    async def list_all() -> DropletList:
        droplets = await store.list()
        return DropletList(droplets=droplets, total=len(droplets), timestamp=iso_now())

    @app.get("/droplets/name/{name:path}", response_model=DropletResponse)
    async def get_by_name(name: str) -> DropletResponse:
        droplet = await store.get_by_name(name)
        if droplet is None:
            raise _not_found(f"named {name!r}")
        return DropletResponse(droplet=droplet, timestamp=iso_now())

    @app.get("/droplets/{droplet_id}", response_model=DropletResponse)
    async def get_one(droplet_id: int) -> DropletResponse:
        droplet = await store.get(droplet_id)
        if droplet is None:
            raise _not_found(str(droplet_id))
        return DropletResponse(droplet=droplet, timestamp=iso_now())

    @app.patch("/droplets/{droplet_id}", response_model=DropletResponse, dependencies=guard)
    async def patch(droplet_id: int, body: DropletPatch) -> DropletResponse:
        droplet = await store.update(droplet_id, body.model_dump(exclude_unset=True))
        if droplet is None:
            raise _not_found(str(droplet_id))
        return DropletResponse(droplet=droplet, timestamp=iso_now())

    @app.delete("/droplets/{droplet_id}", response_model=Deleted, dependencies=guard)
    async def delete(droplet_id: int) -> Deleted:
        if not await store.delete(droplet_id):
            raise _not_found(str(droplet_id))
        return Deleted(success=True, message=f"droplet {droplet_id} deleted", deleted_at=iso_now())

    async def health() -> Status:
        return "active" if await store.ping() else "error"

    async def dependencies() -> Dependencies:
        ok = await store.ping()
        return Dependencies(
            required=[DependencyStatus(name="sqlite", status="active" if ok else "error")],
            missing=[] if ok else ["sqlite"],
        )

    app.include_router(udc_router(
        "registry", __version__, ["droplets", "persistent", *(["bearer-auth"] if token else [])],
        dependencies=dependencies, dependency_names=["sqlite"], health=health,
        write_dependency=require_bearer(token), stats=stats,
    ))
    return app


def read_token(token_file: Path | None) -> str | None:
    """The write token: from ``token_file`` if given, else env DEPLOYERD_REGISTRY_TOKEN, else None (open).

    Never from argv, where every local user can read it in the process list.
    """
    if token_file is not None:
        token = Path(token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def serve(db_path: Path | str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None) -> None:
    """Run the Registry in the foreground until SIGINT/SIGTERM."""
    log.info("registry on %s:%d, db %s, writes %s", host, port, db_path, "need a token" if token else "open")
    uvicorn.run(create_app(Path(db_path), token), host=host, port=port, log_level="info")


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


@contextlib.asynccontextmanager
async def serving(db_path: Path, token: str | None = None, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Run the Registry inside the current event loop on a free port; yields its base URL, stops on exit.

    For tests and for embedding in the daemon's process.
    """
    app = await asyncio.to_thread(create_app, db_path, token)  # opening SQLite touches the disk
    async with serving_app(app, host) as url:
        yield url


@contextlib.asynccontextmanager
async def serving_app(app: Any, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve any ASGI ``app`` in the current event loop on a free port of ``host``; yields the base URL.

    The socket is bound here, so the port is known without a race; uvicorn leaves signals to the host process.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = _EmbeddedServer(uvicorn.Config(app, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(1000):  # bounded wait for the lifespan startup
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if not server.started:
            raise RuntimeError(f"server on {host}:{port} did not start")
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(SystemExit):  # uvicorn exits on a failed startup
            await task
        sock.close()
