"""The Docker engine that runs a sandbox's test hosts: the system one, DOCKER_HOST, or our own private dockerd.

Our private engine gets its own bridge (never docker0), is started detached so it outlives ``up``, and is
stopped by ``down`` only when no sandbox host remains in it and no other ``up`` is under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from deployerd.sandbox_image._proc import Result, SandboxError, file_lock, pid_alive, run, spawn_detached, terminate

log = logging.getLogger("deployerd.sandbox")

ENGINE_RUN_DIR = Path("/run/deployerd-sandbox")
ENGINE_DIR = Path("/var/lib/deployerd-sandbox/engine")
ENGINE_SOCKET = ENGINE_RUN_DIR / "docker.sock"
ENGINE_PIDFILE = ENGINE_RUN_DIR / "docker.pid"
ENGINE_USERS_LOCK = ENGINE_DIR / "users.lock"  # held shared by every `up` in progress
# Our own bridge, not docker0: any other engine on this machine would reconfigure a shared docker0 and cut
# the hosts off. Its subnet is distinct from the hosts' inner bridges (172.29/16, pools in 172.30/16, see
# sandbox_image/daemon.json): an overlap would route SSH replies into the host's own inner bridge.
ENGINE_BRIDGE = "deployerd0"
ENGINE_BIP = "172.28.0.1/16"
DEFAULT_DOCKER_SOCKET = Path("/var/run/docker.sock")

LABEL = "deployerd.sandbox"  # value: sandbox id
LABEL_STATE_DIR = "deployerd.sandbox.state-dir"
LABEL_HOST = "deployerd.sandbox.host"

ENGINE_TIMEOUT = 60.0


class EngineInfo(BaseModel):
    url: str  # DOCKER_HOST form: unix:///path or tcp://...
    private: bool  # our own dockerd (vs. a system engine we merely use)
    started: bool = False  # this sandbox's `up` started it (only then may `down` stop it)
    pid: int | None = None


@dataclass(frozen=True)
class Engine:
    """A Docker engine driven through the docker CLI (argv lists, DOCKER_HOST in the environment)."""

    url: str

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.url}

    async def docker(self, *args: str, stdin: bytes | None = None, check: bool = True,
                     timeout: float | None = 300.0) -> Result:
        return await run(["docker", *args], env=self.env, stdin=stdin, check=check, timeout=timeout)

    async def answers(self) -> bool:
        try:
            res = await self.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=10)
        except SandboxError:
            return False
        return res.rc == 0

    async def labelled(self, kind: str, label: str) -> list[str]:
        """Ids of containers (all states) or volumes carrying ``label`` (``key`` or ``key=value``)."""
        if kind == "container":
            res = await self.docker("ps", "-aq", "--no-trunc", "--filter", f"label={label}")
        else:
            res = await self.docker("volume", "ls", "-q", "--filter", f"label={label}")
        return res.out.split()

    async def inspect(self, ref: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads((await self.docker("inspect", "--type", "container", ref)).out)
        return data[0]


async def _start_private_engine() -> EngineInfo:
    """Start our own dockerd, detached (its own session) so it outlives the `up` command."""
    ENGINE_RUN_DIR.mkdir(parents=True, exist_ok=True)
    (ENGINE_DIR / "data").mkdir(parents=True, exist_ok=True)
    logpath = ENGINE_DIR / "dockerd.log"
    argv = ["dockerd", "--host", f"unix://{ENGINE_SOCKET}", "--data-root", str(ENGINE_DIR / "data"),
            "--exec-root", str(ENGINE_RUN_DIR / "exec"), "--pidfile", str(ENGINE_PIDFILE), "--bridge", ENGINE_BRIDGE]
    t0 = time.monotonic()
    await _ensure_bridge()
    _remove_stale_pidfiles()

    proc = await asyncio.to_thread(spawn_detached, argv, logpath)
    engine = Engine(f"unix://{ENGINE_SOCKET}")
    for _ in range(int(ENGINE_TIMEOUT / 0.2)):
        if await engine.answers():
            log.info("started private Docker engine (pid %d) in %.1f s, log %s", proc.pid, time.monotonic() - t0,
                     logpath)
            return EngineInfo(url=engine.url, private=True, started=True, pid=proc.pid)
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.2)
    rc = proc.poll()
    why = f"dockerd exited with {rc}" if rc is not None else f"not within {ENGINE_TIMEOUT:.0f} s"
    raise SandboxError(f"private Docker engine did not answer ({why}); see {logpath}")


async def _ensure_bridge() -> None:
    """Create our engine's bridge (idempotent); an earlier version of ours put the same subnet on docker0."""
    if (await run(["ip", "link", "show", "dev", ENGINE_BRIDGE], check=False)).rc != 0:
        await run(["ip", "link", "add", "name", ENGINE_BRIDGE, "type", "bridge"])
    if ENGINE_BIP in (await run(["ip", "-o", "-4", "addr", "show", "dev", "docker0"], check=False)).out:
        await run(["ip", "addr", "del", ENGINE_BIP, "dev", "docker0"], check=False)
    if ENGINE_BIP not in (await run(["ip", "-o", "-4", "addr", "show", "dev", ENGINE_BRIDGE])).out:
        await run(["ip", "addr", "add", ENGINE_BIP, "dev", ENGINE_BRIDGE])
    await run(["ip", "link", "set", "dev", ENGINE_BRIDGE, "up"])


async def remove_bridge() -> None:
    """Delete our bridge and the iptables rules dockerd left naming it (it never removes them itself)."""
    for table in ("filter", "nat"):
        res = await run(["iptables", "-t", table, "-S"], check=False)
        for line in res.out.splitlines():
            words = shlex.split(line)
            if words[:1] == ["-A"] and ENGINE_BRIDGE in words:
                await run(["iptables", "-t", table, "-D", *words[1:]], check=False)
    await run(["ip", "link", "del", "dev", ENGINE_BRIDGE], check=False)


def _read_pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip())
    return None


def _private_engine_pid() -> int | None:
    return _read_pid(ENGINE_PIDFILE)


def _remove_stale_pidfiles() -> None:
    """Remove the pid files of a dockerd and containerd that were killed (as a session's processes are before
    CI): both refuse to start, or wait on a dead socket, beside a pid file whose pid another process now holds."""
    containerd_pidfile = ENGINE_RUN_DIR / "exec" / "containerd" / "containerd.pid"
    for path, needle in ((ENGINE_PIDFILE, "dockerd"), (containerd_pidfile, "containerd")):
        pid = _read_pid(path)
        if pid and not pid_alive(pid, needle):
            log.info("removing stale pid file %s (pid %d is not our %s)", path, pid, needle)
            path.unlink(missing_ok=True)


async def find_engine(*, start: bool) -> EngineInfo | None:
    """The engine to use: DOCKER_HOST, else the system socket if it answers, else our private one."""
    if url := os.environ.get("DOCKER_HOST"):
        if await Engine(url).answers():
            return EngineInfo(url=url, private=False)
        raise SandboxError(f"DOCKER_HOST={url} does not answer")
    if DEFAULT_DOCKER_SOCKET.exists() and await Engine(f"unix://{DEFAULT_DOCKER_SOCKET}").answers():
        return EngineInfo(url=f"unix://{DEFAULT_DOCKER_SOCKET}", private=False)
    private = Engine(f"unix://{ENGINE_SOCKET}")
    if not start:
        return EngineInfo(url=private.url, private=True, pid=_private_engine_pid()) if ENGINE_SOCKET.exists() else None
    async with file_lock(ENGINE_DIR / "engine.lock", "engine", timeout=ENGINE_TIMEOUT * 2):
        if ENGINE_SOCKET.exists() and await private.answers():
            return EngineInfo(url=private.url, private=True, started=False, pid=_private_engine_pid())
        return await _start_private_engine()


async def stop_engine_if_unused(engine: Engine, engine_info: EngineInfo) -> None:
    """Stop the private engine unless a sandbox host remains in it or another `up` is under way."""
    fd = os.open(ENGINE_USERS_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("private engine left running: another sandbox is coming up in it")
            return
        if await engine.labelled("container", LABEL):
            log.info("private engine left running: other sandboxes still use it")
            return
        await terminate(engine_info.pid or _private_engine_pid(), "dockerd", timeout=30)
        await remove_bridge()
        log.info("private engine stopped")
    finally:
        os.close(fd)
