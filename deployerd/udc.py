"""The five service endpoints every service of the ecosystem exposes ("UDC"), as a reusable router.

Both the embedded Registry and the deployerd daemon serve them, so the shapes live here once. The router
only reads the process state it is given (callables), so each app decides what "healthy" means for it.
Request counting for ``/state`` is an ASGI middleware (:class:`CountRequests`) over a shared
:class:`RequestStats`, because a router cannot see the app's other routes.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

log = logging.getLogger(__name__)

UDC_VERSION = "1.0"
Status = Literal["active", "inactive", "error"]
Result = Literal["success", "queued", "error"]


def iso_now() -> str:
    """Now in the ecosystem's timestamp format: ISO 8601 UTC ending in "Z" (not "+00:00")."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Health(BaseModel):
    status: Status
    service: str
    version: str
    timestamp: str


class Capabilities(BaseModel):
    version: str
    features: list[str]
    dependencies: list[str]
    udc_version: str = UDC_VERSION
    metadata: dict[str, Any] = Field(default_factory=dict)


class State(BaseModel):
    uptime_seconds: int
    requests_total: int
    errors_last_hour: int
    cpu_percent: float | None = None
    memory_mb: float | None = None
    last_restart: str | None = None


class DependencyStatus(BaseModel):
    name: str
    status: Status


class Dependencies(BaseModel):
    required: list[DependencyStatus] = Field(default_factory=list)
    optional: list[DependencyStatus] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)


class Message(BaseModel):
    """An inter-service message; ``signature`` is carried, not verified (the contract defines no scheme)."""

    trace_id: str
    source: str
    target: str
    message_type: Literal["status", "event", "command", "query"]
    payload: dict[str, Any] = Field(default_factory=dict)
    timestamp: str
    signature: str | None = None


class MessageReceipt(BaseModel):
    received: Literal[True] = True
    trace_id: str
    processed_at: str
    result: Result


class RequestStats:
    """Counts requests and server errors (5xx) for ``/state``; error times kept for one hour only."""

    WINDOW_S = 3600.0

    def __init__(self, max_errors_kept: int = 100_000) -> None:
        self.started = time.monotonic()
        self.started_at = iso_now()
        self.requests_total = 0
        self._errors: deque[float] = deque(maxlen=max_errors_kept)

    def record(self, status_code: int) -> None:
        self.requests_total += 1
        if status_code >= 500:
            self._errors.append(time.monotonic())

    def errors_last_hour(self) -> int:
        cutoff = time.monotonic() - self.WINDOW_S
        while self._errors and self._errors[0] < cutoff:
            self._errors.popleft()
        return len(self._errors)

    def uptime_seconds(self) -> int:
        return int(time.monotonic() - self.started)


class CountRequests:
    """Pure ASGI middleware feeding :class:`RequestStats` (an unhandled exception counts as a 500)."""

    def __init__(self, app: ASGIApp, stats: RequestStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: AsgiMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.stats.record(status)


HealthCheck = Callable[[], Status | Awaitable[Status]]
DependencyCheck = Callable[[], Dependencies | dict[str, Any] | Awaitable[Dependencies | dict[str, Any]]]
MessageHandler = Callable[[Message], Result | Awaitable[Result]]


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a sync or async callable (callers choose; checks that do I/O should be async)."""
    result = fn(*args)
    return await result if inspect.isawaitable(result) else result


def _memory_mb() -> float | None:
    """Resident set size from /proc (a procfs read does not block); None off Linux."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def udc_router(
    service: str,
    version: str,
    features: Sequence[str],
    *,
    dependencies: DependencyCheck | None = None,
    dependency_names: Sequence[str] = (),
    health: HealthCheck | None = None,
    on_message: MessageHandler | None = None,
    write_dependency: Callable[..., Any] | None = None,
    stats: RequestStats | None = None,
    metadata: dict[str, Any] | None = None,
) -> APIRouter:
    """The five UDC endpoints for ``service``.

    ``health``/``dependencies`` are called per request (sync or async); a health check that raises reports
    "error" rather than failing the probe. ``write_dependency`` guards POST /message (e.g. a bearer token).
    Pass the same ``stats`` to :class:`CountRequests` so ``/state`` counts the whole app's traffic.
    """
    router = APIRouter(tags=["udc"])
    stats = stats or RequestStats()
    caps = Capabilities(
        version=version,
        features=list(features),
        dependencies=list(dependency_names),
        metadata=dict(metadata or {}),
    )

    @router.get("/health", response_model=Health)
    async def get_health() -> Health:
        status: Status = "active"
        if health is not None:
            try:
                status = await _call(health)
            except Exception:  # a failing check is a health answer, not a server error
                log.exception("health check of %s failed", service)
                status = "error"
        return Health(status=status, service=service, version=version, timestamp=iso_now())

    @router.get("/capabilities", response_model=Capabilities)
    async def get_capabilities() -> Capabilities:
        return caps

    @router.get("/state", response_model=State, response_model_exclude_none=True)
    async def get_state() -> State:
        uptime = max(time.monotonic() - stats.started, 1e-6)
        return State(
            uptime_seconds=stats.uptime_seconds(),
            requests_total=stats.requests_total,
            errors_last_hour=stats.errors_last_hour(),
            cpu_percent=round(100 * time.process_time() / uptime, 1),
            memory_mb=_memory_mb(),
            last_restart=stats.started_at,
        )

    @router.get("/dependencies", response_model=Dependencies)
    async def get_dependencies() -> Dependencies:
        if dependencies is None:
            return Dependencies()
        return Dependencies.model_validate(await _call(dependencies))

    guard = [Depends(write_dependency)] if write_dependency is not None else []

    @router.post("/message", response_model=MessageReceipt, dependencies=guard)
    async def post_message(message: Message) -> MessageReceipt:
        result: Result = "success"
        if on_message is not None:
            try:
                result = await _call(on_message, message)
            except Exception:  # the sender gets "error"; the payload is not logged (it may hold secrets)
                log.exception("handling message %s (%s) failed", message.trace_id, message.message_type)
                result = "error"
        return MessageReceipt(trace_id=message.trace_id, processed_at=iso_now(), result=result)

    return router
