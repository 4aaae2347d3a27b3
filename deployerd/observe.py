"""Observe: read what really runs on every host and what the Registry lists, as ``ObservedState``.

Hosts are read concurrently, each over its one kept SSH connection, in a constant number of round trips
(the runtime lists its instances once, whatever the number of services). A host that cannot be reached is
recorded as unreachable with the reason naming it; it is never taken as "nothing runs there".
A host that failed is not tried again by the reconcile: a background probe retries it at doubling intervals
(2 s to 10 s) and asks for a reconcile when it answers. So a dead host never makes the reconcile of the other
hosts wait for its connect timeout, it gets no stream of attempts, and a healed one is seen within 10 s,
whatever the resync interval. A host going down or answering again (or answering for the first time) is
published as HostDown / HostUp on the event bus.

A host is asked only for the runtimes its services need (``methods``: from the desired state, plus any
runtime it showed instances of before), so a host with systemd services only is never asked for Docker and
needs none installed. Facts are per runtime: one that fails (its Docker engine stopped) is recorded as silent
with the reason, one not asked as unobserved, and the planner makes only that runtime's services unknown on
the host (half the facts taken as "nothing runs there" would prune what still runs). A host every asked
runtime of which failed is unreachable as a whole, retried by its probe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deployerd import events
from deployerd.backoff import Backoff
from deployerd.connection import ConnectionPool, HostAddress, HostUnreachable
from deployerd.desired import HostSpec
from deployerd.ingress import IngressError, IngressProxy
from deployerd.observed import HostFacts, Instance, ObservedState, RegistryEntry
from deployerd.registry_client import RegistryClient, RegistryError
from deployerd.runtimes import RUNTIMES, HostHandle
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
        self._warned: dict[str, str] = {}  # host -> the problem last logged: one WARNING per change, not per pass
        self._had: dict[str, set[str]] = {}  # host -> runtimes it showed instances of: asked again (to prune them)

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

    def methods(self, spec: HostSpec, wanted: Collection[str] | None) -> list[str]:
        """The runtimes to ask ``spec``'s host for: ``wanted`` (None: every runtime) and those it had instances of."""
        asked = set(RUNTIMES) if wanted is None else set(wanted) | self._had.get(spec.name, set())
        return sorted(asked & set(RUNTIMES))

    def remember(self, host: str, method: str) -> None:
        """Ask ``host`` for ``method`` from now on (something of ours may run there: it must be read to prune)."""
        if method in RUNTIMES:
            self._had.setdefault(host, set()).add(method)

    async def facts(self, spec: HostSpec, methods: Collection[str] | None = None) -> HostFacts:
        """The host's facts, read from the runtimes ``methods`` names (None: all; see ``methods``). A host
        that is down is reported with its last error at once, its probe retrying it meanwhile (a changed
        address in hosts.yaml is tried at once)."""
        address = self.address(spec)
        down = self.down.get(spec.name)
        asked = self.methods(spec, methods)
        if down is None or down.address != address:
            facts = await self._read(spec, asked)
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
            self.warn(spec.name, down.error)
        down.asked_at = time.monotonic()
        probe = self._probes.get(spec.name)
        if probe is None or probe.done():
            self._probes[spec.name] = asyncio.create_task(self._probe(spec, down, asked), name=f"probe {spec.name}")
        return HostFacts(host=spec.name, reachable=False, error=down.error, down_since=down.since)

    async def _probe(self, spec: HostSpec, down: HostDown, methods: list[str]) -> None:
        """Retry a down host at its backoff times, off the reconcile; ends when it answers (then ``on_back``),
        when its record was replaced, or when no reconcile asked for it for PROBE_IDLE_S."""
        while self.down.get(spec.name) is down and time.monotonic() - down.asked_at < PROBE_IDLE_S:
            await asyncio.sleep(down.backoff.remaining_s())
            facts = await self._read(spec, methods)
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
            self.warn(spec.name, down.error)

    def warn(self, name: str, problem: str | None, kind: str = "unreachable") -> None:
        """Log a host's problem of one kind as a WARNING when it differs from the last one logged (None: it has
        none now), so a host down for an hour gives one line, not one per reconcile."""
        key = f"{kind} {name}"
        if problem is None:
            if self._warned.pop(key, None) is not None:
                log.info("host %s: no longer %s", name, kind)
        elif self._warned.get(key) != problem:
            self._warned[key] = problem
            log.warning("%s", problem if problem.startswith(f"host {name}") else f"host {name}: {problem}")

    def _answered(self, name: str) -> None:
        self.warn(name, None)
        if name not in self._up:
            self._up.add(name)
            self.bus.publish(events.HostUp(host=name))

    async def _read(self, spec: HostSpec, methods: list[str]) -> HostFacts:
        """Read the runtimes ``methods`` names, each on its own: one failing is silent, the others' facts stand."""
        try:
            handle = await self.handle(spec)
            instances: list[Instance] = []
            kept: dict[str, list[str]] = {}
            silent: dict[str, str] = {}
            for method in methods:
                runtime = handle.runtimes[method]
                try:
                    found, releases = await runtime.observe()
                except HostUnreachable:
                    raise
                except Exception as e:  # its engine API (over the tunnel) failed: not known, not empty
                    silent[method] = f"host {spec.name}: {method} not answering: {type(e).__name__}: {e}"
                    log.debug("observing %s on host %s failed: %s", method, spec.name, e)
                    await runtime.close()
                    continue
                instances += found
                for service, ids in releases.items():
                    kept.setdefault(service, []).extend(ids)
            if methods and len(silent) == len(methods):  # nothing answered: the host is down, its probe retries
                await self.pool.drop(spec.name)
                return HostFacts(host=spec.name, reachable=False, error="; ".join(silent.values()))
            self._had[spec.name] = {i.method for i in instances} | (self._had.get(spec.name, set()) & set(silent))
            ingress_error = None
            if spec.ingress != "none":
                try:
                    ingress_error = await _serving(handle, spec, instances)
                except HostUnreachable:
                    raise
                except Exception as e:
                    await self.pool.drop(spec.name)
                    return HostFacts(host=spec.name, reachable=False,
                                     error=f"host {spec.name}: ingress proxy not answering: {type(e).__name__}: {e}")
            for method, why in silent.items():
                self.warn(spec.name, why, kind=f"{method} silent")
            for method in set(methods) - set(silent):
                self.warn(spec.name, None, kind=f"{method} silent")
            return HostFacts(host=spec.name, reachable=True, instances=instances, releases_kept=kept,
                             ingress_error=ingress_error, host_key=handle.conn.host_key, silent=silent,
                             unobserved=sorted(set(RUNTIMES) - set(methods)))
        except HostUnreachable as e:
            return HostFacts(host=spec.name, reachable=False, error=str(e))

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
            async with proxy.changing():
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


async def observe(hosts: Hosts, specs: dict[str, HostSpec], registry: RegistryClient,
                  methods: Mapping[str, Collection[str]] | None = None) -> ObservedState:
    """Read every host and the Registry concurrently. ``methods``: the runtimes each host's services use
    (`methods_by_host`; None: every runtime on every host)."""
    names = sorted(specs)
    facts_list, registry_result = await asyncio.gather(
        asyncio.gather(*(hosts.facts(specs[n], None if methods is None else methods.get(n, ())) for n in names)),
        _registry(registry),
    )
    entries, error = registry_result
    for entry in (entries or {}).values():  # a runtime the Registry places a service of ours in: ask it next time
        meta = entry.metadata or {}
        if str(meta.get("managed_by", "")).startswith("deployerd") and str(meta.get("host", "")) in specs:
            hosts.remember(str(meta["host"]), str(meta.get("method", "")))
    checked = same_machine(dict(zip(names, facts_list, strict=True)))
    for name, f in checked.items():  # made unknown here (its connection is fine, the entry is not)?
        hosts.warn(name, f.error if not f.reachable and f.host_key else None, kind="the same machine as another")
    return ObservedState(hosts=checked, registry=entries, registry_error=error)


def methods_by_host(placed: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    """host -> the runtimes of the services placed on it, from (host, method) pairs of the desired state."""
    out: dict[str, set[str]] = {}
    for host, method in placed:
        out.setdefault(host, set()).add(method)
    return out


def same_machine(facts: dict[str, HostFacts]) -> dict[str, HostFacts]:
    """Entries whose hosts showed one SSH host key are one machine under two names (an alias, a second
    address): each would see the other's services as its own and prune them as "moved". Their facts are
    not trusted: every such entry is reported unknown, naming the others, so nothing there is pruned or
    deployed until hosts.yaml keeps one of them."""
    by_key: dict[str, list[str]] = {}
    for name, f in facts.items():
        if f.reachable and f.host_key:
            by_key.setdefault(f.host_key, []).append(name)
    out = dict(facts)
    for key, names in by_key.items():
        if len(names) < 2:
            continue
        for name in names:
            others = ", ".join(n for n in names if n != name)
            error = (f"host {name} is the same machine as {others} (same SSH host key {key}); "
                     "keep one entry per machine in hosts.yaml")
            out[name] = HostFacts(host=name, reachable=False, error=error, host_key=key)
    return out


async def _registry(registry: RegistryClient) -> tuple[dict[str, RegistryEntry] | None, str | None]:
    try:
        return await registry.list(), None
    except RegistryError as e:
        return None, str(e)
