"""End-to-end harness: a real desired-state git repository and a real daemon (engine + HTTP API) in-process.

Every daemon gets its own instance name, state dir and repository, so tests sharing the sandbox's hosts and
Registry never see (or prune) each other's services.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import uvicorn
import yaml

from deployerd.api import create_app
from deployerd.config import Settings
from deployerd.daemon import close_engine, open_engine
from deployerd.engine import Engine
from deployerd.registry_client import RegistryClient
from deployerd.sandbox import SandboxInfo
from deployerd.store import Job

DOCKERFILE = """FROM busybox:latest
COPY www /www
CMD ["busybox", "httpd", "-f", "-v", "-p", "{port}", "-h", "/www"]
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


class DesiredRepo:
    """A real git repository of desired state, committed to the way a user would."""

    def __init__(self, path: Path, sandbox: SandboxInfo) -> None:
        self.path = path
        path.mkdir(parents=True)
        git(path, "init", "-q", "-b", "main")
        git(path, "config", "user.email", "test@deployerd.local")
        git(path, "config", "user.name", "deployerd tests")
        hosts = {
            h.name: {"address": h.address, "ssh_port": h.ssh_port, "user": h.user,
                     "public_address": h.internal_address}
            for h in sandbox.hosts
        }
        self.write("hosts.yaml", yaml.safe_dump({"hosts": hosts}))

    def write(self, rel: str, text: str) -> None:
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def service(self, name: str, port: int, host: str = "sbx-1", version: str = "1", *,
                dockerfile: str | None = None, health_timeout_s: float = 15, **extra: Any) -> None:
        """A small busybox web service: its manifest and its source folder."""
        manifest = {"name": name, "host": host, "method": "docker", "port": port, "source": f"services/{name}",
                    "health": {"path": "/health", "timeout_s": health_timeout_s, "interval_s": 0.5}, **extra}
        self.write(f"services/{name}.yaml", yaml.safe_dump(manifest))
        self.write(f"services/{name}/Dockerfile", dockerfile or DOCKERFILE.format(port=port))
        self.write(f"services/{name}/www/health",
                   json.dumps({"status": "active", "service": name, "version": version}))
        self.write(f"services/{name}/www/index.html", f"<h1>{name} v{version}</h1>\n")

    def remove(self, rel: str) -> None:
        git(self.path, "rm", "-rq", rel)

    def commit(self, message: str) -> str:
        git(self.path, "add", "-A")
        git(self.path, "commit", "-qm", message)
        return git(self.path, "rev-parse", "HEAD")


class Daemon:
    """deployerd with its API on a loopback port; tests drive reconciles directly, or run the real loop."""

    def __init__(self, engine: Engine, url: str, token: str) -> None:
        self.engine = engine
        self.url = url
        self.token = token
        self.http = httpx.AsyncClient(base_url=url, timeout=30)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def reconcile(self, force: set[str] | None = None) -> list[Any]:
        """One reconcile, then wait for the jobs it started (and for none to be left running)."""
        actions = await self.engine.reconcile(["test"], force=force)
        await self.engine.drain()
        return actions

    async def jobs(self, service: str) -> list[Job]:
        return await self.engine.store.jobs(service)

    async def last_job(self, service: str) -> Job:
        jobs = await self.jobs(service)
        assert jobs, f"no job for {service}"
        return jobs[0]


def settings_for(tmp: Path, sandbox: SandboxInfo, repo: DesiredRepo, **overrides: Any) -> Settings:
    assert sandbox.registry is not None, "the sandbox runs no Registry"
    tmp.mkdir(parents=True, exist_ok=True)
    return Settings(
        repo_url=str(repo.path), branch="main", state_dir=tmp / "state",
        instance=overrides.pop("instance", None) or f"t{secrets.token_hex(3)}",  # shared by daemons that share hosts
        registry_url=sandbox.registry.url, registry_token_file=Path(sandbox.registry.token_path),
        ssh_key=Path(sandbox.hosts[0].key_path), known_hosts=Path(sandbox.hosts[0].known_hosts),
        api_token_file=private_file(tmp / "api.token", secrets.token_urlsafe(24)),
        webhook_secret_file=private_file(tmp / "webhook.secret", secrets.token_urlsafe(24)),
        listen_port=free_port(), poll_interval_s=3600, resync_interval_s=3600,
        **overrides,
    )


@asynccontextmanager
async def running_daemon(settings: Settings, loop: bool = False, cleanup: bool = True) -> AsyncIterator[Daemon]:
    """Open the daemon (store, Registry client, engine) and serve its API; with ``loop`` also run its loop.

    With ``cleanup`` (the default) its deployments are removed at the end; a test that restarts the
    daemon passes False for the first run so the second finds them.
    """
    engine = await open_engine(settings)
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=settings.listen_port,
                                           log_level="warning"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    serving = asyncio.create_task(server.serve())
    stop = asyncio.Event()
    loop_task = asyncio.create_task(engine.run(stop)) if loop else None
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.05)
    daemon = Daemon(engine, f"http://127.0.0.1:{settings.listen_port}", settings.secret("api_token") or "")
    try:
        yield daemon
    finally:
        stop.set()  # the loop first: a resync running during the cleanup would redeploy what it removes
        if loop_task is not None:
            await loop_task
        if cleanup:
            await _remove_instance(engine)
        server.should_exit = True
        await serving
        await daemon.http.aclose()
        await close_engine(engine)


async def _remove_instance(engine: Engine) -> None:
    """Leave the shared sandbox as found: this test daemon's deployments (containers, images, units, files,
    through each runtime's own prune) and its Registry entries go."""
    await engine.drain()
    for spec in (engine.desired.hosts.values() if engine.desired else []):
        try:
            handle = await engine.hosts.handle(spec)
        except Exception:
            continue
        for runtime in handle.runtimes.values():
            instances, kept = await runtime.observe()
            for service in {i.service for i in instances} | set(kept):
                await runtime.remove_service(service)
    for name, entry in (await engine.registry.list()).items():
        if (entry.metadata or {}).get("instance") == engine.settings.instance:
            await engine.registry.deregister(name)


def registry_client(sandbox: SandboxInfo) -> RegistryClient:
    assert sandbox.registry is not None
    return RegistryClient(sandbox.registry.url, token=Path(sandbox.registry.token_path).read_text().strip())


async def http_get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.get(url)
