"""A sandbox's hosts formed into a Docker Swarm, with the cluster's image registry on the manager.

`deployerd sandbox up --hosts 3 --swarm`: the first host is the manager, the others join as workers. The
manager runs Debian's ``docker-registry`` (port 5000) and every node's engine trusts it as an insecure
registry (plain HTTP on the hosts' own bridge): the setting is added to each host's daemon.json when the
sandbox comes up, and the engine reloads it (SIGHUP), so the shared host image stays as it is.

Init and join go through each engine's API over the SSH-forwarded socket: the join token never appears on
a command line. The routing mesh does not work on this kernel (no ip_vs module): services in the sandbox
publish their ports in host mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence

import aiodocker
import aiohttp
from pydantic import BaseModel

from deployerd.connection import CommandError, Connection, HostAddress
from deployerd.sandbox_image._proc import SandboxError

log = logging.getLogger("deployerd.sandbox")

REGISTRY_PORT = 5000
DAEMON_JSON = "/etc/docker/daemon.json"
READY_TIMEOUT = 60.0


class SwarmInfo(BaseModel):
    """The sandbox's Swarm: its manager (a sandbox host's name), workers, and the image registry."""

    manager: str
    workers: list[str]
    registry: str  # host:port every node trusts, on the manager
    nodes: dict[str, str]  # host name -> Swarm node id


class _Host(BaseModel):
    """What this module needs of a sandbox host (sandbox.HostInfo has these fields)."""

    name: str
    address: str
    ssh_port: int
    user: str
    key_path: str
    known_hosts: str
    internal_address: str


@contextlib.asynccontextmanager
async def _opened(host: _Host) -> AsyncIterator[tuple[Connection, aiodocker.Docker]]:
    """An SSH connection to ``host`` and a Docker API client on its forwarded engine socket."""
    conn = await Connection.open(HostAddress(name=host.name, address=host.address, port=host.ssh_port,
                                             user=host.user, key_path=host.key_path, known_hosts=host.known_hosts))
    try:
        connector = aiohttp.UnixConnector(await conn.docker_socket())
        session = aiohttp.ClientSession(connector=connector)
        docker = aiodocker.Docker(url="unix://localhost", connector=connector, session=session)
        try:
            yield conn, docker
        finally:
            await docker.close()
            await session.close()
    finally:
        await conn.close()


async def trust_registry(conn: Connection, registry: str) -> None:
    """Add ``registry`` to the engine's insecure-registries in daemon.json and have dockerd reload it."""
    current = json.loads((await conn.read_bytes(DAEMON_JSON)).decode() or "{}")
    wanted = sorted({*current.get("insecure-registries", []), registry})
    if current.get("insecure-registries") != wanted:
        await conn.put_bytes(DAEMON_JSON, (json.dumps({**current, "insecure-registries": wanted}, indent=2)
                                           + "\n").encode(), mode=0o644)
        await conn.run(["systemctl", "reload", "docker"])
    deadline = time.monotonic() + READY_TIMEOUT
    while True:  # the reload is asynchronous: wait until the engine reports the registry as insecure
        done = await conn.run(["docker", "info", "--format", "{{json .RegistryConfig.IndexConfigs}}"], check=False)
        if done.ok and registry in json.loads(done.stdout or "{}"):
            return
        if time.monotonic() > deadline:
            raise SandboxError(f"{conn.host.name}: engine does not trust registry {registry}: {done.stderr[-200:]}")
        await asyncio.sleep(0.3)


# The package's config asks for htpasswd auth; the sandbox's registry is open on the hosts' own bridge only.
# A production registry wants TLS and auth (see README, "Docker Swarm").
REGISTRY_CONFIG = f"""version: 0.1
storage:
  filesystem:
    rootdirectory: /var/lib/docker-registry
  delete:
    enabled: true
http:
  addr: :{REGISTRY_PORT}
"""
REGISTRY_DROPIN = """[Service]
ExecStart=
ExecStart=/usr/bin/docker-registry serve /etc/docker/registry/deployerd-sandbox.yml
"""


async def _start_image_registry(conn: Connection) -> None:
    """Run Debian's docker-registry on the manager (its unit ships disabled) and wait for its /v2/."""
    await conn.put_bytes("/etc/docker/registry/deployerd-sandbox.yml", REGISTRY_CONFIG.encode())
    await conn.makedirs("/etc/systemd/system/docker-registry.service.d")
    await conn.put_bytes("/etc/systemd/system/docker-registry.service.d/deployerd-sandbox.conf",
                         REGISTRY_DROPIN.encode())
    await conn.run(["systemctl", "daemon-reload"])
    # restart: the package's SysV script may have started it at boot with its own config
    await conn.run(["systemctl", "enable", "docker-registry.service"], check=False)
    await conn.run(["systemctl", "restart", "docker-registry.service"])
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            await conn.run(["curl", "-fsS", "-o", "/dev/null", f"http://127.0.0.1:{REGISTRY_PORT}/v2/"])
            return
        except CommandError as e:
            if time.monotonic() > deadline:
                raise SandboxError(f"{conn.host.name}: docker-registry does not answer: {e}") from e
        await asyncio.sleep(0.3)


async def form_swarm(hosts: Sequence[BaseModel]) -> SwarmInfo:
    """The first host inits a Swarm (advertising its bridge address) and runs the registry; the rest join."""
    members = [_Host.model_validate(h.model_dump()) for h in hosts]
    if len(members) < 1:
        raise SandboxError("a Swarm needs at least one host")
    manager, workers = members[0], members[1:]
    registry = f"{manager.internal_address}:{REGISTRY_PORT}"
    t0 = time.monotonic()
    nodes: dict[str, str] = {}
    async with _opened(manager) as (mconn, mdocker):
        await asyncio.gather(_start_image_registry(mconn), trust_registry(mconn, registry))
        with contextlib.suppress(aiodocker.DockerError):
            await mdocker.swarm.leave(force=True)  # a fresh host is in no Swarm; this keeps `up` idempotent
        nodes[manager.name] = await mdocker.swarm.init(advertise_addr=manager.internal_address,
                                                       listen_addr="0.0.0.0:2377")
        token = (await mdocker.swarm.inspect())["JoinTokens"]["Worker"]

        async def join(worker: _Host) -> None:
            async with _opened(worker) as (conn, docker):
                await trust_registry(conn, registry)
                await docker.swarm.join(join_token=token, remote_addrs=[f"{manager.internal_address}:2377"],
                                        listen_addr="0.0.0.0:2377", advertise_addr=worker.internal_address)
                nodes[worker.name] = (await docker.system.info())["Swarm"]["NodeID"]

        await asyncio.gather(*(join(w) for w in workers))
        deadline = time.monotonic() + READY_TIMEOUT
        while True:  # every node Ready in the manager's view
            listed = await mdocker.nodes.list()
            ready = {n["ID"] for n in listed if n["Status"]["State"] == "ready"}
            if set(nodes.values()) <= ready:
                break
            if time.monotonic() > deadline:
                raise SandboxError(f"Swarm nodes not ready after {READY_TIMEOUT:g} s: {sorted(nodes)}")
            await asyncio.sleep(0.3)
    log.info("Swarm formed in %.1f s: manager %s, workers %s, registry %s", time.monotonic() - t0,
             manager.name, ", ".join(w.name for w in workers) or "-", registry)
    return SwarmInfo(manager=manager.name, workers=[w.name for w in workers], registry=registry, nodes=nodes)
