"""The long-running daemon: the reconcile loop and the HTTP API on one event loop."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from deployerd.api import create_app
from deployerd.config import Settings
from deployerd.engine import Engine
from deployerd.registry_client import RegistryClient
from deployerd.store import Store

log = logging.getLogger(__name__)


async def open_engine(settings: Settings) -> Engine:
    """Everything the loop needs, opened (store, Registry client); the caller closes it with ``close_engine``."""
    if not settings.repo_url:
        raise ValueError("repo_url is not set (config file or DEPLOYERD_REPO_URL)")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store = await Store.open(settings.db_path)
    registry = RegistryClient(settings.registry_url, token=settings.secret("registry_token"))
    return Engine(settings, store, registry)


async def close_engine(engine: Engine) -> None:
    await engine.close()
    await engine.registry.aclose()
    await engine.store.close()


async def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM: uvicorn owns the signals; when it stops, the loop drains and stops."""
    engine = await open_engine(settings)
    stop = asyncio.Event()
    server = uvicorn.Server(uvicorn.Config(
        create_app(engine), host=settings.listen_host, port=settings.listen_port, log_level="warning",
        access_log=False,
    ))
    loop_task = asyncio.create_task(engine.run(stop))
    log.info("deployerd listening on http://%s:%d, watching %s (%s)", settings.listen_host, settings.listen_port,
             engine.source.display_url, settings.branch)
    try:
        await server.serve()
    finally:
        stop.set()
        await loop_task
        await close_engine(engine)
