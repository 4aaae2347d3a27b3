"""Throwaway production servers on this machine: containers that boot systemd, sshd and their own dockerd.

deployerd's end-to-end tests and its demo need real servers. A sandbox host is a container run from an
image built once with debootstrap (see shared/testbed.md); it is reached over real SSH, with its host key
read out of band through the engine (never trusted on first use). A sandbox also runs the embedded Registry.

Ownership is by label and pid only: ``down`` removes what carries this sandbox's labels and the processes it
recorded, never anything else, so several sandboxes (demo, test run) can share one engine.

The engine is sandbox_engine.py's, the hosts sandbox_hosts.py's; this module records a sandbox and
brings it up and down.

CLI: ``python -m deployerd.sandbox up --hosts N [--state-dir D]``, ``down``, ``status``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import secrets
import socket
import sys
import time
from pathlib import Path

import httpx
from pydantic import BaseModel, Field, computed_field

from deployerd.sandbox_engine import (  # noqa: F401 - Engine, EngineInfo and LABEL are public here too
    ENGINE_USERS_LOCK,
    LABEL,
    LABEL_HOST,
    LABEL_STATE_DIR,
    Engine,
    EngineInfo,
    find_engine,
    stop_engine_if_unused,
)
from deployerd.sandbox_hosts import (  # noqa: F401 - HostInfo and connect are public here too
    INOTIFY_MINIMUMS,
    HostInfo,
    connect,
    diagnose,
    ensure_client_key,
    host_key,
    raise_inotify_limits,
    sandbox_id,
    start_host,
    wait_ready,
    write_private,
)
from deployerd.sandbox_image import cache_dir, ensure_image, image_ref, image_version  # noqa: F401 - public here too
from deployerd.sandbox_image._proc import Result, SandboxError, file_lock, pid_alive, run, spawn_detached, terminate  # noqa: F401
from deployerd.sandbox_swarm import SwarmInfo, form_swarm

log = logging.getLogger("deployerd.sandbox")

REGISTRY_TIMEOUT = 30.0


# --- models (the sandbox.json edge) ---------------------------------------------------------------------------


class RegistryInfo(BaseModel):
    url: str
    token_path: str
    pid: int
    db: str


class SandboxInfo(BaseModel):
    id: str
    state_dir: str
    image: str = ""
    engine: EngineInfo
    hosts: list[HostInfo] = Field(default_factory=list)
    registry: RegistryInfo | None = None
    swarm: SwarmInfo | None = None  # `up --swarm`: the hosts form one Swarm (sandbox_swarm)


class HostStatus(BaseModel):
    container: str
    name: str
    state: str


class SandboxStatus(BaseModel):
    id: str | None
    state_dir: str
    engine_url: str | None
    engine_answers: bool
    expected_hosts: int = 0  # hosts recorded in sandbox.json
    hosts: list[HostStatus] = Field(default_factory=list)
    registry_url: str | None = None
    registry_running: bool = False

    @computed_field  # type: ignore[prop-decorator]
    @property
    def healthy(self) -> bool:
        """Everything recorded is running: callers (the demo) reuse the sandbox instead of a new `up`."""
        return (self.id is not None and self.engine_answers and len(self.hosts) == self.expected_hosts
                and all(h.state == "running" for h in self.hosts)
                and (self.registry_url is None or self.registry_running))


# --- small process helpers ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the registry ---------------------------------------------------------------------------------------------


def _registry_available() -> bool:
    try:
        return importlib.util.find_spec("deployerd.registry.__main__") is not None
    except ModuleNotFoundError:
        return False


async def _start_registry(state_dir: Path) -> RegistryInfo | None:
    """Start the embedded Registry detached (own session) and wait until GET /droplets answers."""
    if not _registry_available():
        log.warning("deployerd.registry is not available yet: sandbox runs without a Registry")
        return None
    token_path = state_dir / "registry.token"
    if not token_path.exists():
        write_private(token_path, secrets.token_urlsafe(32) + "\n")
    db = state_dir / "registry.db"
    port = _free_port()
    argv = [sys.executable, "-m", "deployerd.registry", "serve", "--db", str(db), "--host", "127.0.0.1",
            "--port", str(port), "--token-file", str(token_path)]
    logpath = state_dir / "registry.log"

    proc = await asyncio.to_thread(spawn_detached, argv, logpath)
    pid = proc.pid
    (state_dir / "registry.pid").write_text(f"{pid}\n")  # found by `up`/`down` even if sandbox.json is lost
    url = f"http://127.0.0.1:{port}"
    token = token_path.read_text().strip()
    async with httpx.AsyncClient(timeout=2.0) as client:
        for _ in range(int(REGISTRY_TIMEOUT / 0.2)):
            with contextlib.suppress(httpx.TransportError):
                await client.get(f"{url}/droplets", headers={"Authorization": f"Bearer {token}"})
                log.info("registry answering at %s (pid %d)", url, pid)
                return RegistryInfo(url=url, token_path=str(token_path), pid=pid, db=str(db))
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.2)
    await terminate(pid, "deployerd.registry")
    raise SandboxError(f"registry did not answer at {url}; see {logpath}")


async def _stop_registry(state_dir: Path, info: SandboxInfo | None) -> None:
    pids = {info.registry.pid} if info and info.registry else set()
    with contextlib.suppress(OSError, ValueError):
        pids.add(int((state_dir / "registry.pid").read_text().strip()))
    for pid in pids:
        await terminate(pid, "deployerd.registry")
    (state_dir / "registry.pid").unlink(missing_ok=True)


# --- up / down / status ---------------------------------------------------------------------------------------


def default_state_dir() -> Path:
    return Path(os.environ.get("DEPLOYERD_SANDBOX_DIR") or Path.cwd() / ".sandbox")


def load_info(state_dir: Path) -> SandboxInfo | None:
    """The recorded sandbox of ``state_dir``, or None if it is not up."""
    f = Path(state_dir) / "sandbox.json"
    if not f.exists():
        return None
    return SandboxInfo.model_validate_json(f.read_text())


def _save_info(info: SandboxInfo) -> None:
    f = Path(info.state_dir) / "sandbox.json"
    tmp = f.with_suffix(".tmp")
    tmp.write_text(info.model_dump_json(indent=2) + "\n")
    tmp.replace(f)


async def _remove_ours(engine: Engine, sid: str, state_dir: Path) -> int:
    """Remove this sandbox's containers and volumes, and orphans of sandboxes whose state dir is gone."""
    doomed = set(await engine.labelled("container", f"{LABEL}={sid}"))
    for cid in await engine.labelled("container", LABEL):
        if cid in doomed:
            continue
        labels = (await engine.inspect(cid)).get("Config", {}).get("Labels") or {}
        owner = labels.get(LABEL_STATE_DIR)
        if owner == str(state_dir) or (owner and not Path(owner).exists()):
            doomed.add(cid)
    if doomed:
        await engine.docker("rm", "-f", "-v", *sorted(doomed))
    vols = await engine.labelled("volume", f"{LABEL}={sid}")
    if vols:
        await engine.docker("volume", "rm", "-f", *vols, check=False)
    return len(doomed)


async def up_async(hosts: int, state_dir: Path | None = None, swarm: bool = False) -> SandboxInfo:
    """Bring up ``hosts`` fresh test hosts and the Registry; write and return ``<state_dir>/sandbox.json``.

    ``swarm``: the hosts then form a Swarm (the first one its manager, with the cluster's image registry).

    Hosts this state dir already had are replaced (a clean slate per `up`); to reuse a running sandbox,
    check ``status(state_dir).healthy`` and ``load_info`` first.
    """
    if hosts < 0:
        raise ValueError("hosts must be >= 0")
    state_dir = Path(state_dir or default_state_dir()).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    sid = sandbox_id(state_dir)
    key_path = ensure_client_key(state_dir)
    pubkey = (state_dir / "id_ed25519.pub").read_text()
    old = load_info(state_dir)
    await _stop_registry(state_dir, old)
    try:
        async with file_lock(ENGINE_USERS_LOCK, "engine users", shared=True):
            return await _up_locked(hosts, state_dir, sid, key_path, pubkey, old, t0, swarm)
    except BaseException:
        with contextlib.suppress(Exception):
            await down_async(state_dir)  # outside the users lock, so an engine we started can stop again
        raise


async def _up_locked(hosts: int, state_dir: Path, sid: str, key_path: Path, pubkey: str,
                     old: SandboxInfo | None, t0: float, swarm: bool = False) -> SandboxInfo:
    """The body of `up`, run while this process counts as a user of the engine (so no `down` stops it)."""
    raise_inotify_limits()
    engine_info = await find_engine(start=True)
    assert engine_info is not None
    if old and old.engine.started and old.engine.url == engine_info.url:
        engine_info.started = True  # still ours to stop at `down`
    engine = Engine(engine_info.url)
    if n := await _remove_ours(engine, sid, state_dir):
        log.info("removed %d leftover container(s) of an earlier run", n)
    info = SandboxInfo(id=sid, state_dir=str(state_dir), engine=engine_info)
    _save_info(info)  # from here on, `down` can clean up whatever follows
    try:
        info.image = await ensure_image(engine.env)
        t1 = time.monotonic()
        started = await asyncio.gather(*(start_host(engine, info.image, sid, state_dir, i, pubkey)
                                         for i in range(1, hosts + 1)))
        known_hosts = state_dir / "known_hosts"
        lines = []
        for name, cid in started:
            data = await engine.inspect(cid)
            port = int(data["NetworkSettings"]["Ports"]["22/tcp"][0]["HostPort"])
            info.hosts.append(HostInfo(name=name, ssh_port=port, key_path=str(key_path),
                                       known_hosts=str(known_hosts), container=data["Name"].lstrip("/"),
                                       internal_address=data["NetworkSettings"]["IPAddress"]))
            lines.append(f"[127.0.0.1]:{port} {await host_key(engine, cid)}")
        known_hosts.write_text("".join(f"{line}\n" for line in lines))
        _save_info(info)
        await asyncio.gather(*(wait_ready(h) for h in info.hosts))
        log.info("%d host(s) ready in %.1f s", hosts, time.monotonic() - t1)
        info.registry = await _start_registry(state_dir)
        if swarm:
            info.swarm = await form_swarm(info.hosts)
        _save_info(info)
    except BaseException:
        await diagnose(engine, info.hosts)
        raise
    log.info("sandbox %s up in %.1f s (state %s)", sid, time.monotonic() - t0, state_dir)
    return info


async def down_async(state_dir: Path | None = None) -> None:
    """Remove this sandbox's containers, volumes and processes (by label and recorded pid); idempotent."""
    state_dir = Path(state_dir or default_state_dir()).resolve()
    info = load_info(state_dir)
    id_file = state_dir / "sandbox.id"
    sid = info.id if info else (id_file.read_text().strip() if id_file.exists() else None)
    await _stop_registry(state_dir, info)
    engine_info = info.engine if info else await find_engine(start=False)
    if engine_info is not None:
        engine = Engine(engine_info.url)
        if await engine.answers():
            if sid:
                await _remove_ours(engine, sid, state_dir)
            if engine_info.private and engine_info.started:
                await stop_engine_if_unused(engine, engine_info)
    (state_dir / "sandbox.json").unlink(missing_ok=True)


async def status_async(state_dir: Path | None = None) -> SandboxStatus:
    """What of this sandbox is running: its host containers and the Registry."""
    state_dir = Path(state_dir or default_state_dir()).resolve()
    info = load_info(state_dir)
    st = SandboxStatus(id=info.id if info else None, state_dir=str(state_dir),
                       engine_url=info.engine.url if info else None, engine_answers=False,
                       expected_hosts=len(info.hosts) if info else 0)
    if info is None:
        return st
    engine = Engine(info.engine.url)
    st.engine_answers = await engine.answers()
    if st.engine_answers:
        for cid in await engine.labelled("container", f"{LABEL}={info.id}"):
            data = await engine.inspect(cid)
            st.hosts.append(HostStatus(container=data["Name"].lstrip("/"), state=data["State"]["Status"],
                                       name=(data["Config"]["Labels"] or {}).get(LABEL_HOST, "")))
    if info.registry:
        st.registry_url = info.registry.url
        st.registry_running = pid_alive(info.registry.pid, "deployerd.registry")
    return st


def up(hosts: int, state_dir: Path | None = None, swarm: bool = False) -> SandboxInfo:
    """Sync wrapper of :func:`up_async` for the CLI."""
    return asyncio.run(up_async(hosts, state_dir, swarm))


def down(state_dir: Path | None = None) -> None:
    """Sync wrapper of :func:`down_async` for the CLI."""
    asyncio.run(down_async(state_dir))


def status(state_dir: Path | None = None) -> SandboxStatus:
    """Sync wrapper of :func:`status_async` for the CLI."""
    return asyncio.run(status_async(state_dir))


def host_memory_bytes(container_id: str) -> int | None:
    """Memory a host uses now (cgroup v1; `docker stats` reports 0 for these hosts)."""
    mem = Path("/sys/fs/cgroup/memory")
    for f in (mem / "docker" / container_id / "memory.usage_in_bytes",  # cgroupfs driver (our engine)
              mem / "system.slice" / f"docker-{container_id}.scope" / "memory.usage_in_bytes"):  # systemd driver
        with contextlib.suppress(OSError, ValueError):
            return int(f.read_text())
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployerd.sandbox", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start N test hosts and the Registry")
    p_up.add_argument("--hosts", type=int, default=2)
    p_up.add_argument("--swarm", action="store_true", help="form the hosts into a Swarm with an image registry")
    for name in ("down", "status"):
        sub.add_parser(name)
    for p in sub.choices.values():
        p.add_argument("--state-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("asyncssh", "httpx"):  # one line per SSH channel or request drowns the progress lines
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.cmd == "up":
            print(up(args.hosts, args.state_dir, args.swarm).model_dump_json(indent=2))
        elif args.cmd == "down":
            down(args.state_dir)
        else:
            print(status(args.state_dir).model_dump_json(indent=2))
    except SandboxError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
