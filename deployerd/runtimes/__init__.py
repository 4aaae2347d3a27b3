"""Deployment methods behind one interface (see ``base.Runtime``), and one host's handle on them."""

from __future__ import annotations

from dataclasses import dataclass, field

from deployerd.connection import Connection
from deployerd.desired import HostSpec
from deployerd.runtimes.base import ReleaseContext, Runtime, StartError
from deployerd.runtimes.docker import DockerRuntime
from deployerd.runtimes.swarm import SwarmRuntime
from deployerd.runtimes.systemd import SystemdRuntime

RUNTIMES: dict[str, type[Runtime]] = {DockerRuntime.method: DockerRuntime, SystemdRuntime.method: SystemdRuntime,
                                      SwarmRuntime.method: SwarmRuntime}

__all__ = ["HostHandle", "ReleaseContext", "Runtime", "RUNTIMES", "StartError", "reports_events"]


def reports_events(method: str) -> bool:
    """Does the runtime stream its instances' events (``Runtime.watch``)? Swarm's are not followed yet: its
    services are healed by the reconcile."""
    return RUNTIMES[method].watch is not Runtime.watch


@dataclass
class HostHandle:
    """One host's live SSH connection and a runtime per method, all sharing that connection."""

    spec: HostSpec
    conn: Connection
    runtimes: dict[str, Runtime] = field(default_factory=dict)

    @classmethod
    def for_connection(cls, spec: HostSpec, conn: Connection, instance: str = "default") -> HostHandle:
        return cls(spec, conn, {name: rt(conn, spec, instance) for name, rt in RUNTIMES.items()})

    def runtime(self, method: str) -> Runtime:
        return self.runtimes[method]

    async def close(self) -> None:
        for rt in self.runtimes.values():
            await rt.close()
