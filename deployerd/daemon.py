"""The long-running daemon: the reconcile loop and the HTTP API on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator

import uvicorn

from deployerd.api import create_app
from deployerd.audit import AuditLog, git_commit_info
from deployerd.config import ConfigError, Settings
from deployerd.connection import sweep_socket_dirs
from deployerd.engine import Engine
from deployerd.notify import Notifier
from deployerd.registry_client import RegistryClient
from deployerd.store import Store

log = logging.getLogger(__name__)


async def open_engine(settings: Settings) -> Engine:
    """Everything the loop needs, opened (store, Registry client); the caller closes it with ``close_engine``."""
    if not settings.repo_url:
        raise ConfigError("repo_url is not set: set it in the config file (--config FILE, $DEPLOYERD_CONFIG or "
                          "/etc/deployerd/config.yaml) or as DEPLOYERD_REPO_URL")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store = await Store.open(settings.db_path)
    registry = RegistryClient(settings.registry_url, token=settings.secret("registry_token"))
    return Engine(settings, store, registry)


class Subscribers:
    """The event stream's slow subscribers, each on tasks of its own: notifications and the audit trail."""

    def __init__(self, engine: Engine) -> None:
        s = engine.settings
        engine.metrics.reconcile_interval.set(s.resync_interval_s)
        self.notifier = Notifier(s.notifications, engine.metrics)
        self.audit = AuditLog(s.audit_path, git_commit_info(engine.source.repo_path), s.api_token_name)
        self.notifier.start(engine.events)
        self.audit.start(engine.events)

    async def close(self) -> None:
        """After the jobs drained: what they published is written and delivered (bounded), then stop."""
        await self.audit.close()
        await self.notifier.drain(limit_s=15)
        await self.notifier.close()


async def close_engine(engine: Engine) -> None:
    await engine.close()
    await engine.registry.aclose()
    await engine.store.close()


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) about our state; a no-op when not started by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


async def _watchdog(server: uvicorn.Server) -> None:
    """READY=1 once the API listens, then WATCHDOG=1 at half the unit's WatchdogSec while the loop runs:
    a blocked event loop stops the pings and systemd restarts the daemon."""
    while not server.started:
        await asyncio.sleep(0.05)
    sd_notify("READY=1\nSTATUS=reconciling")
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec <= 0:
        return
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(usec / 2e6)


class _Server(uvicorn.Server):
    """uvicorn, except for one thing: once it has shut down on SIGTERM or SIGINT it raises that signal again
    with the default handler, which would end the process before ``serve`` drains the jobs in flight and
    closes the store. Here the signal has done its work once the server stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


async def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM: uvicorn owns the signals; when it stops, the loop drains and stops."""
    for path in await asyncio.to_thread(sweep_socket_dirs):
        log.info("removed %s, left by a daemon that was killed", path)
    engine = await open_engine(settings)
    stop = asyncio.Event()
    server = _Server(uvicorn.Config(
        create_app(engine), host=settings.listen_host, port=settings.listen_port, log_level="warning",
        access_log=False,
    ))
    subscribers = Subscribers(engine)
    loop_task = asyncio.create_task(engine.run(stop))
    watchdog = asyncio.create_task(_watchdog(server))
    log.info("deployerd listening on http://%s:%d, watching %s (%s)", settings.listen_host, settings.listen_port,
             engine.source.display_url, settings.branch)
    try:
        await server.serve()
    finally:
        sd_notify("STOPPING=1")
        watchdog.cancel()
        stop.set()
        await loop_task
        await subscribers.close()
        await close_engine(engine)
