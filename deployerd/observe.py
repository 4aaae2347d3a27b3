"""Observe: read what really runs on every host and what the Registry lists, as ``ObservedState``.

Hosts are read concurrently, each over its one kept SSH connection, in a constant number of round trips
(the runtime lists its instances once, whatever the number of services). A host that cannot be reached is
recorded as unreachable with the reason naming it; it is never taken as "nothing runs there".
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from deployerd.connection import ConnectionPool, HostAddress, HostUnreachable
from deployerd.desired import HostSpec
from deployerd.observed import HostFacts, ObservedState
from deployerd.registry_client import RegistryClient, RegistryError
from deployerd.runtimes import HostHandle

log = logging.getLogger(__name__)


class Hosts:
    """The daemon's hosts: one pooled SSH connection each, and a handle (runtimes) bound to it."""

    def __init__(
        self, key_path: Path | None, known_hosts: Path, connect_timeout: float = 10.0, instance: str = "default"
    ) -> None:
        self.instance = instance
        self.key_path = key_path
        self.known_hosts = known_hosts
        self.pool = ConnectionPool(connect_timeout=connect_timeout)
        self._handles: dict[str, HostHandle] = {}

    def address(self, spec: HostSpec) -> HostAddress:
        return HostAddress(
            name=spec.name,
            address=spec.address,
            port=spec.ssh_port,
            user=spec.user,
            key_path=str(self.key_path or Path.home() / ".ssh" / "id_ed25519"),
            known_hosts=str(self.known_hosts),
        )

    async def handle(self, spec: HostSpec) -> HostHandle:
        """The host's handle on its live connection (reconnecting when needed); raises HostUnreachable."""
        conn = await self.pool.get(self.address(spec))
        handle = self._handles.get(spec.name)
        if handle is None or handle.conn is not conn or handle.spec != spec:
            if handle is not None:
                await handle.close()
            handle = self._handles[spec.name] = HostHandle.for_connection(spec, conn, self.instance)
        return handle

    async def facts(self, spec: HostSpec) -> HostFacts:
        try:
            handle = await self.handle(spec)
            instances, kept = [], {}
            for runtime in handle.runtimes.values():
                found, releases = await runtime.observe()
                instances += found
                for service, ids in releases.items():
                    kept.setdefault(service, []).extend(ids)
            return HostFacts(host=spec.name, reachable=True, instances=instances, releases_kept=kept)
        except HostUnreachable as e:
            return HostFacts(host=spec.name, reachable=False, error=str(e))
        except Exception as e:  # the engine API over the tunnel failed: the host is not known, not empty
            log.warning("observing host %s failed: %s", spec.name, e)
            await self.pool.drop(spec.name)
            return HostFacts(host=spec.name, reachable=False, error=f"host {spec.name}: {type(e).__name__}: {e}")

    async def close(self) -> None:
        for handle in self._handles.values():
            await handle.close()
        self._handles.clear()
        await self.pool.close_all()


async def observe(hosts: Hosts, specs: dict[str, HostSpec], registry: RegistryClient) -> ObservedState:
    """Read every host and the Registry concurrently."""
    names = sorted(specs)
    facts_list, registry_result = await asyncio.gather(
        asyncio.gather(*(hosts.facts(specs[n]) for n in names)),
        _registry(registry),
    )
    entries, error = registry_result
    return ObservedState(hosts=dict(zip(names, facts_list)), registry=entries, registry_error=error)


async def _registry(registry: RegistryClient) -> tuple[dict | None, str | None]:
    try:
        return await registry.list(), None
    except RegistryError as e:
        return None, str(e)
