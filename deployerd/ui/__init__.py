"""The status page at ``/ui``: read-only HTML rendered by the daemon, kept live over server-sent events.

No build step and no assets from elsewhere: Jinja2 templates (autoescaped) and one small handwritten script
ship in this package. Every page renders whole without JavaScript; the script only swaps in the parts that
the event stream says changed. Pages read the engine's last look and the store, never the hosts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from deployerd import __version__
from deployerd.events import EventBus, ReconcileDone
from deployerd.store import PHASES
from deployerd.ui import views
from deployerd.ui.live import LiveJobs, Rendered, Renders, stream

if TYPE_CHECKING:
    from deployerd.engine import Engine

HERE = Path(__file__).parent
STATIC = {"ui.css": "text/css; charset=utf-8", "ui.js": "text/javascript; charset=utf-8"}


def _short(value: str | None, n: int = 12) -> str:
    return (value or "")[:n]


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _when(iso: str | None) -> str:
    """``2026-12-01T19:58:18.630329Z`` as ``2026-12-01 19:58:18 UTC`` (the full value stays in ``datetime``)."""
    if not iso:
        return ""
    day, _, clock = iso.partition("T")
    return f"{day} {clock[:8]} UTC" if clock else day


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True, auto_reload=False)
    env.filters.update(short=_short, seconds=_seconds, when=_when, q=lambda s: quote(str(s), safe=""))
    env.globals.update(version=__version__, phases=PHASES, failed=views.failed)
    return env


class Pages:
    """Renders each page as a whole and as its live parts, from one set of templates."""

    def __init__(self, engine: Engine, live: LiveJobs) -> None:
        self.engine = engine
        self.live = live
        self.env = _environment()
        self._macros: Any = self.env.get_template("_macros.html").module

    def _part(self, template: str, **context: Any) -> str:
        return self.env.get_template(template).render(**context)

    def _page(self, template: str, parts: dict[str, str], **context: Any) -> Rendered:
        main = self._part(template, parts={k: Markup(v) for k, v in parts.items()}, **context)
        return Rendered(main=main, parts=parts)

    # Views are read on the loop (they await the store and git); rendering them, which takes a while for
    # hundreds of rows, runs on a thread: the views are plain data that nothing changes any more.
    async def overview(self) -> Rendered:
        return await asyncio.to_thread(self._overview, await views.overview(self.engine, self.live))

    def _overview(self, o: views.Overview) -> Rendered:
        parts = {"summary": self._part("_summary.html", o=o), "grid-head": self._part("_grid_head.html", o=o)}
        row_of = self._macros.row_of
        for row in o.rows:
            parts[row.dom_id] = str(row_of(row, o.hosts))
        return self._page("overview.html", parts, o=o)

    async def service(self, name: str) -> Rendered | None:
        s = await views.service_page(self.engine, self.live, name)
        return None if s is None else await asyncio.to_thread(self._service, s)

    def _service(self, s: views.ServicePage) -> Rendered:
        parts = {"service-status": self._part("_service_status.html", s=s),
                 "service-plan": self._part("_service_plan.html", s=s),
                 "service-jobs": self._part("_service_jobs.html", s=s)}
        return self._page("service.html", parts, s=s)

    async def hosts(self) -> Rendered:
        return await asyncio.to_thread(self._hosts, views.hosts_page(self.engine, self.live))

    def _hosts(self, rows: list[views.HostRow]) -> Rendered:
        parts = {r.dom_id: self._part("_host_row.html", h=r) for r in rows}
        return self._page("hosts.html", parts, rows=rows)

    def document(self, title: str, view: str, events: str, main: str) -> str:
        return self.env.get_template("base.html").render(title=title, view=view, events=events, main=Markup(main))


def ui_router(engine: Engine, bus: EventBus) -> APIRouter:
    """The ``/ui`` routes. ``bus`` is the engine's event stream: the page subscribes to it for live updates."""
    live = LiveJobs()
    bus.subscribe(live)

    def on_reconcile(event: object) -> None:
        if isinstance(event, ReconcileDone) and engine.observed is not None:
            live.observed({n: f.reachable for n, f in engine.observed.hosts.items()}, event.at)

    bus.subscribe(on_reconcile)
    pages = Pages(engine, live)
    renders = Renders(live)
    router = APIRouter(prefix="/ui", include_in_schema=False)

    def html(title: str, view: str, events: str, rendered: Rendered) -> HTMLResponse:
        return HTMLResponse(pages.document(title, view, events, rendered.main),
                            headers={"Cache-Control": "no-store", "Content-Security-Policy": _CSP,
                                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"})

    @router.get("", response_class=HTMLResponse)
    @router.get("/", response_class=HTMLResponse)
    async def overview() -> HTMLResponse:
        return html("Services", "overview", "/ui/events?view=overview", await pages.overview())

    @router.get("/hosts", response_class=HTMLResponse)
    async def hosts() -> HTMLResponse:
        return html("Hosts", "hosts", "/ui/events?view=hosts", await pages.hosts())

    @router.get("/services/{name}", response_class=HTMLResponse)
    async def service(name: str) -> HTMLResponse:
        rendered = await pages.service(name)
        if rendered is None:
            raise HTTPException(404, f"no service named {name!r}")
        return html(name, "service", f"/ui/events?view=service&name={quote(name, safe='')}", rendered)

    @router.get("/static/{asset}")
    async def static(asset: str) -> Response:
        if asset not in STATIC:
            raise HTTPException(404, "no such asset")
        return Response((HERE / "static" / asset).read_bytes(), media_type=STATIC[asset],
                        headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})

    @router.get("/events")
    async def events(request: Request, view: str = Query("overview", pattern="^(overview|hosts|service)$"),
                     name: str = "") -> StreamingResponse:
        render: Callable[[], Any]
        if view == "service":
            if await pages.service(name) is None:
                raise HTTPException(404, f"no service named {name!r}")
            render = partial(_or_empty, pages.service, name)
        else:
            render = pages.overview if view == "overview" else pages.hosts
        body = stream(bus, renders, f"{view}:{name}", render, request.is_disconnected)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return router


async def _or_empty(render: Callable[[str], Any], name: str) -> Rendered:
    """A service page that stopped existing (its manifest and its jobs gone) renders as empty, not an error."""
    return await render(name) or Rendered(main="<p>This service is gone.</p>", parts={})


# Only this page's own script and styles run: no inline script, nothing from elsewhere.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
