"""Observed state: what is really running, as facts read from hosts and the Registry.

These are plain data (no I/O here): `observe` fills them in, `plan` reads them. A host that could not be
reached is recorded as such (``reachable=False``) so the planner can say "unknown" instead of
mistaking an outage for a missing service, which would trigger a needless redeploy or, worse, a prune.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field, PrivateAttr


class RunState(StrEnum):
    """Life state of one deployed instance (a container or a systemd unit)."""

    RUNNING = "running"
    STOPPED = "stopped"  # exists, not running: exited, created, inactive
    FAILED = "failed"  # exited non-zero / unit failed / restart loop


class Instance(BaseModel):
    """One deployed instance of a service on a host, identified by the labels deployerd put on it."""

    service: str
    host: str
    method: str  # "docker" | "systemd" | "swarm"
    release: str  # release id (hash of everything that defines it)
    commit: str = ""  # git commit it was deployed from ("" for out-of-band)
    state: RunState
    ref: str = ""  # runtime reference: container id, unit name
    port: int | None = None
    private_port: int | None = None  # behind the host's ingress proxy: where it listens on 127.0.0.1
    managed_by: str = "git"  # "git" or "api" (out-of-band POST /deploy)
    current: bool = True  # the instance that should serve (False: kept stopped for rollback)
    inputs: dict[str, str] = Field(default_factory=dict)  # per-input digests (desired.Release.inputs) it was built from
    healthy: bool | None = None  # last health probe: None when not probed
    # a Swarm service: what was done to it by hand (scaled, updated), Swarm's own rollback of a release, and the
    # addresses of the nodes its tasks run on (sorted; probed between deploys, one is its Registry endpoint)
    drift: str | None = None
    note: str | None = None
    nodes: list[str] = Field(default_factory=list)


class HostFacts(BaseModel):
    """Everything known about one host after one observation round."""

    host: str
    reachable: bool
    error: str | None = None  # why it is unreachable, naming the host
    down_since: str | None = None  # unreachable: since when (ISO time of the first failed observation in a row)
    instances: list[Instance] = Field(default_factory=list)
    releases_kept: dict[str, list[str]] = Field(default_factory=dict)  # service -> release ids kept on host
    ingress_error: str | None = None  # the host's ingress proxy was found dead or refusing (named for /health)
    host_key: str = ""  # fingerprint of the SSH host key seen: two entries showing one key are one machine
    # Facts are per runtime: a runtime asked for that failed is silent (method -> why, naming the host), one
    # not asked (no service of it placed here) is unobserved. Either way nothing of that method is known here.
    silent: dict[str, str] = Field(default_factory=dict)
    unobserved: list[str] = Field(default_factory=list)
    _by_service: dict[str, list[Instance]] | None = PrivateAttr(default=None)

    def unknown(self, method: str) -> str | None:
        """Why this host's ``method`` instances are not known (None: they were read): an empty answer from a
        silent or unasked runtime must never be taken for "nothing runs there"."""
        if not self.reachable:
            return f"host {self.host} unreachable: {self.error or 'unknown error'}"
        if method in self.silent:
            return self.silent[method]
        if method in self.unobserved:
            return f"host {self.host}: {method} not observed (no {method} service placed on it)"
        return None

    def of_service(self, service: str) -> list[Instance]:
        """The instances of ``service`` here, in observed order. Indexed once (facts are not changed after
        observation): asking per service must not scan every instance of the host each time (O(n^2) at 500)."""
        if self._by_service is None:
            index: dict[str, list[Instance]] = {}
            for i in self.instances:
                index.setdefault(i.service, []).append(i)
            self._by_service = index
        return self._by_service.get(service, [])

    def current(self, service: str) -> Instance | None:
        """The instance meant to serve for ``service`` (a running one first, else the newest current one)."""
        mine = [i for i in self.of_service(service) if i.current]
        running = [i for i in mine if i.state is RunState.RUNNING]
        return running[0] if running else (mine[0] if mine else None)


class RegistryEntry(BaseModel):
    """A droplet record as the Registry returns it (the fields deployerd compares)."""

    id: int
    name: str
    endpoint: str
    status: str
    metadata: dict[str, Any] | None = None


class ObservedState(BaseModel):
    """All hosts' facts plus the Registry; ``registry`` is None when the Registry could not be read."""

    hosts: dict[str, HostFacts] = Field(default_factory=dict)
    registry: dict[str, RegistryEntry] | None = None
    registry_error: str | None = None

    def method_of(self, host: str, service: str) -> str:
        """The runtime ``service`` was observed in on ``host`` (docker when it was not seen there)."""
        facts = self.hosts.get(host)
        return next((i.method for i in (facts.instances if facts else []) if i.service == service), "docker")

    def node_of(self, host: str, service: str) -> str | None:
        """The node a Swarm service was observed answering on (its Registry endpoint in host mode), else None."""
        facts = self.hosts.get(host)
        inst = facts.current(service) if facts else None
        return inst.nodes[0] if inst and inst.nodes else None

    def owns_entry(self, service: str, instance: str) -> bool:
        """Whether the Registry entry of ``service`` is this daemon instance's (deployerd-managed, git's)."""
        entry = (self.registry or {}).get(service)
        meta = (entry.metadata if entry else None) or {}
        return meta.get("managed_by") == "deployerd" and meta.get("instance", "default") == instance
