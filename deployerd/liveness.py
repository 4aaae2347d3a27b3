"""Health between deploys: each running service's own health probe, at start and at every resync.

Verify Health proves a release once; after that a process can run and still fail its probe (a file removed
by hand, a dependency gone). The status model says "Healthy" only when the manifest's probe passed at the
last check, and says when that was.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from deployerd.connection import Connection
from deployerd.desired import HostSpec, ServiceSpec
from deployerd.health import probe_once
from deployerd.observed import RunState
from deployerd.plan import ActionKind
from deployerd.snapshot import Snapshot
from deployerd.store import utcnow

log = logging.getLogger(__name__)

PARALLEL = 8  # probes at once (each one a port forward over its host's connection)


@dataclass(frozen=True)
class Probe:
    release: str
    passed: bool
    detail: str  # what it answered, e.g. "/health: HTTP 404"
    checked_at: str  # ISO time
    checked_ts: float  # the same, seconds since the epoch (for /metrics)


class Liveness:
    """The last probe of each service; ``check`` probes every service a snapshot saw running and in sync."""

    def __init__(self, client: httpx.AsyncClient, connection: Callable[[HostSpec], Awaitable[Connection]]) -> None:
        self.client = client
        self.connection = connection
        self.probes: dict[str, Probe] = {}

    async def check(self, snap: Snapshot) -> None:
        slots = asyncio.Semaphore(PARALLEL)
        targets: list[tuple[ServiceSpec, HostSpec, str, list[str]]] = []
        for a in snap.actions:
            spec, host, facts = snap.desired.services.get(a.service), snap.desired.hosts.get(a.host), \
                snap.observed.hosts.get(a.host)
            inst = facts.current(a.service) if facts is not None and facts.reachable else None
            if a.kind is ActionKind.NOOP and spec and host and inst and inst.state is RunState.RUNNING:
                targets.append((spec, host, inst.release, inst.nodes))

        async def one(spec: ServiceSpec, host: HostSpec, release: str, nodes: list[str]) -> None:
            async with slots:
                try:
                    conn = await self.connection(host)
                    passed, detail = True, ""
                    for node in nodes or ["127.0.0.1"]:  # a Swarm service: each node its tasks run on
                        passed, detail = await probe_once(self.client, conn, spec, node)
                        if not passed:
                            detail = f"{detail} (node {node})" if nodes else detail
                            break
                except Exception as e:  # the host went away meanwhile: no verdict
                    log.debug("probing %s on %s: %s", spec.name, host.name, e)
                    return
            before = self.probes.get(spec.name)
            if passed != (before.passed if before else True):
                (log.info if passed else log.warning)("health of %s on %s: %s", spec.name, host.name,
                                                      "passes again" if passed else f"fails ({detail})")
            self.probes[spec.name] = Probe(release=release, passed=passed, detail=detail, checked_at=utcnow(),
                                           checked_ts=time.time())

        await asyncio.gather(*(one(*t) for t in targets))
        for name in set(self.probes) - set(snap.desired.services):
            del self.probes[name]
