"""Observe: read what really runs on every host and what the Registry lists, as ``ObservedState``.

Hosts are read concurrently, each over its one kept SSH connection, in a constant number of round trips
(the runtime lists its instances once, whatever the number of services). A host that cannot be reached is
recorded as unreachable with the reason naming it; it is never taken as "nothing runs there".
A host that failed is not tried again by the reconcile: a background probe retries it at doubling intervals
(2 s to 10 s) and asks for a reconcile when it answers. So a dead host never makes the reconcile of the other
hosts wait for its connect timeout, it gets no stream of attempts, and a healed one is seen within 10 s,
whatever the resync interval. A host going down or answering again (or answering for the first time) is
published as HostDown / HostUp on the event bus.

A host whose SSH answers but one runtime does not (its Docker engine stopped) is unreachable as a whole, the
reason naming the runtime: half the facts of a host would let the planner take the silent half for "nothing
runs there" (a registry-only prune of a service still running), so its systemd services wait too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deployerd import events
from deployerd.backoff import Backoff
from deployerd.connection import ConnectionPool, HostAddress, HostUnreachable
from deployerd.desired import HostSpec
from deployerd.ingress import IngressError, IngressProxy
from deployerd.observed import HostFacts, Instance, ObservedState, RegistryEntry
from deployerd.registry_client import RegistryClient, RegistryError
from deployerd.runtimes import HostHandle
from deployerd.runtimes.base import qualified_name
from deployerd.store import utcnow

log = logging.getLogger(__name__)

HOST_RETRY_MIN_S, HOST_RETRY_MAX_S = 2.0, 10.0
PROBE_IDLE_S = 600.0  # a probe stops when no reconcile asked for its host that long (it left hosts.yaml)


@dataclass
class HostDown:
    """A host whose last observation failed: why, since when, and when it is tried again."""

    address: HostAddress
    error: str
    since: str
    last_attempt_at: str = ""
    asked_at: float = 0.0  # monotonic: the last reconcile that wanted this host's facts
    backoff: Backoff = field(default_factory=lambda: Backoff(HOST_RETRY_MIN_S, HOST_RETRY_MAX_S))

    def failed(self, error: str) -> None:
        self.error, self.last_attempt_at = error, utcnow()
        self.backoff.fail()

    @property
    def attempts(self) -> int:
        return self.backoff.failures

    @property
    def retry_in_s(self) -> float:
        return round(self.backoff.remaining_s(), 1)


class Hosts:
    """The daemon's hosts: one pooled SSH connection each, and a handle (runtimes) bound to it."""

    def __init__(
        self, key_path: Path | None, known_hosts: Path, connect_timeout: float = 10.0, instance: str = "default",
        bus: events.EventBus | None = None,
    ) -> None:
        self.instance = instance
        self.bus = bus or events.EventBus()
        self.key_path = key_path
        self.known_hosts = known_hosts
        self.pool = ConnectionPool(connect_timeout=connect_timeout)
        self._handles: dict[str, HostHandle] = {}
        self.down: dict[str, HostDown] = {}  # hosts whose last observation failed (read by /health)
        self.on_back: Callable[[str], None] | None = None  # called when a down host answers again
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._up: set[str] = set()  # hosts whose last observation answered (HostUp published)

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
        """The host's facts. A host that is down is reported with its last error at once, its probe retrying
        it meanwhile (a changed address in hosts.yaml is tried at once)."""
        address = self.address(spec)
        down = self.down.get(spec.name)
        if down is None or down.address != address:
            facts = await self._read(spec)
            if facts.reachable:
                self.down.pop(spec.name, None)
                self._answered(spec.name)
                return facts
            went_down = down is None  # not a down host's new address
            down = self.down[spec.name] = HostDown(address=address, error="", since=utcnow())
            down.failed(facts.error or "unknown error")
            self._up.discard(spec.name)
            if went_down:
                self.bus.publish(events.HostDown(host=spec.name, error=down.error))
        down.asked_at = time.monotonic()
        probe = self._probes.get(spec.name)
        if probe is None or probe.done():
            self._probes[spec.name] = asyncio.create_task(self._probe(spec, down), name=f"probe {spec.name}")
        return HostFacts(host=spec.name, reachable=False, error=down.error)

    async def _probe(self, spec: HostSpec, down: HostDown) -> None:
        """Retry a down host at its backoff times, off the reconcile; ends when it answers (then ``on_back``),
        when its record was replaced, or when no reconcile asked for it for PROBE_IDLE_S."""
        while self.down.get(spec.name) is down and time.monotonic() - down.asked_at < PROBE_IDLE_S:
            await asyncio.sleep(down.backoff.remaining_s())
            facts = await self._read(spec)
            if self.down.get(spec.name) is not down:
                return
            if facts.reachable:
                del self.down[spec.name]
                log.info("host %s answers again after %d failed attempts", spec.name, down.attempts)
                self._answered(spec.name)
                if self.on_back is not None:
                    self.on_back(spec.name)
                return
            down.failed(facts.error or "unknown error")

    def _answered(self, name: str) -> None:
        if name not in self._up:
            self._up.add(name)
            self.bus.publish(events.HostUp(host=name))

    async def _read(self, spec: HostSpec) -> HostFacts:
        method = "ssh"
        try:
            handle = await self.handle(spec)
            instances: list[Instance] = []
            kept: dict[str, list[str]] = {}
            for runtime in handle.runtimes.values():
                method = runtime.method
                found, releases = await runtime.observe()
                instances += found
                for service, ids in releases.items():
                    kept.setdefault(service, []).extend(ids)
            ingress_error = None
            if spec.ingress != "none":
                method = "ingress proxy"
                ingress_error = await _serving(handle, spec, instances)
            return HostFacts(host=spec.name, reachable=True, instances=instances, releases_kept=kept,
                             ingress_error=ingress_error)
        except HostUnreachable as e:
            return HostFacts(host=spec.name, reachable=False, error=str(e))
        except Exception as e:  # the engine API over the tunnel failed: the host is not known, not empty
            log.warning("observing host %s failed: %s", spec.name, e)
            await self.pool.drop(spec.name)
            return HostFacts(host=spec.name, reachable=False,
                             error=f"host {spec.name}: {method} not answering: {type(e).__name__}: {e}")

    async def close(self) -> None:
        for probe in self._probes.values():
            probe.cancel()
        await asyncio.gather(*self._probes.values(), return_exceptions=True)
        self._probes.clear()
        for handle in self._handles.values():
            await handle.close()
        self._handles.clear()
        await self.pool.close_all()


async def _serving(handle: HostHandle, spec: HostSpec, instances: list[Instance]) -> str | None:
    """Behind an ingress the instance that serves is the one the proxy sends requests to, not every running one
    (an interrupted switch leaves two running): mark the others not current. A dead proxy is started again
    from its config (what was switched to last), and named in the facts for /health."""
    proxy = IngressProxy(handle.conn, spec.name)
    error = None
    try:
        state = await proxy.state()
    except IngressError as e:
        error = str(e)
        log.warning("%s; starting it again", e)
        try:
            async with proxy.lock:
                await proxy.apply(await proxy.routes())
            state = await proxy.state()
            error += " (found dead; started again from its config)"
        except IngressError as again:
            return f"{error}; starting it again failed: {again}"
    for inst in instances:
        active = state.active(qualified_name(inst.service, handle.runtimes[inst.method].instance))
        if active is not None and inst.private_port is not None:
            inst.current = inst.release == active.name
    return error


async def observe(hosts: Hosts, specs: dict[str, HostSpec], registry: RegistryClient) -> ObservedState:
    """Read every host and the Registry concurrently."""
    names = sorted(specs)
    facts_list, registry_result = await asyncio.gather(
        asyncio.gather(*(hosts.facts(specs[n]) for n in names)),
        _registry(registry),
    )
    entries, error = registry_result
    return ObservedState(hosts=dict(zip(names, facts_list, strict=True)), registry=entries, registry_error=error)


async def _registry(registry: RegistryClient) -> tuple[dict[str, RegistryEntry] | None, str | None]:
    try:
        return await registry.list(), None
    except RegistryError as e:
        return None, str(e)
