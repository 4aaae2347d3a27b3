"""The one interface the phases drive, whatever runs the service (a Docker container or a systemd unit).

The planner, the phase runner, rollback and metrics never ask which method they drive: they call these
methods. Each implementation reads its facts in a constant number of round trips per host (not per service),
so a reconcile that finds nothing to do stays cheap as services grow.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from deployerd.connection import Connection, RemoteFileError, temp_name_pattern
from deployerd.desired import HostSpec, Release, ServiceSpec, endpoint_url
from deployerd.ingress import IngressProxy
from deployerd.layout import Layout, release_id
from deployerd.observed import Instance, RunState

LABEL_PREFIX = "deployerd."
PRIVATE_PORT_LABEL = f"{LABEL_PREFIX}private_port"
MARKER_FILE = ".deployerd.json"  # in each service dir deployerd made: what makes a folder ours to remove


class ForeignDirectory(Exception):
    """A service dir deployerd did not create (no marker of this instance and service): nothing is removed."""


def qualified_name(service: str, instance: str) -> str:
    """The service's name on a host: plain for the default instance, prefixed by any other instance's name,
    so two daemons sharing a host never collide on container, image, unit or directory names."""
    return service if instance == "default" else f"{instance}-{service}"


@dataclass(frozen=True)
class ReleaseContext:
    """Everything one release of one service needs on its host: the one way every runtime method names a
    release (per-service methods take the service's name)."""

    spec: ServiceSpec
    host: HostSpec
    release: Release
    commit: str
    managed_by: str = "git"
    instance: str = "default"  # the daemon instance that owns it (several may share a host)
    env: dict[str, str] = field(default_factory=dict)  # resolved values (secrets included): never logged

    @property
    def qualified_name(self) -> str:
        return qualified_name(self.spec.name, self.instance)

    @property
    def layout(self) -> Layout:
        return Layout(self.host.base_dir, self.qualified_name)

    def with_env(self, env: dict[str, str]) -> ReleaseContext:
        return dataclasses.replace(self, env=env)

    @property
    def service_dir(self) -> str:
        return self.layout.service_dir

    @property
    def release_dir(self) -> str:
        return self.layout.release_dir(self.release.id)

    @property
    def env_file(self) -> str:
        return self.layout.env_file(self.release.id)

    @property
    def behind_ingress(self) -> bool:
        """The host's proxy binds the public port: the instance listens on a private port beside the old one
        (never for a Swarm service: Swarm publishes its ports itself)."""
        return self.host.ingress != "none" and self.spec.method != "swarm"

    @property
    def endpoint(self) -> str:
        return endpoint_url(self.host, self.spec.port)

    def labels(self) -> dict[str, str]:
        return {
            f"{LABEL_PREFIX}instance": self.instance,
            f"{LABEL_PREFIX}service": self.spec.name,
            f"{LABEL_PREFIX}release": self.release.id,
            f"{LABEL_PREFIX}commit": self.commit,
            f"{LABEL_PREFIX}managed_by": self.managed_by,
            f"{LABEL_PREFIX}port": str(self.spec.port),
            f"{LABEL_PREFIX}inputs": json.dumps(self.release.inputs, sort_keys=True),
        }


@dataclass(frozen=True)
class BuildResult:
    """What Build made: ``artifact`` (an image tag, a venv path) and method-specific details for the record."""

    artifact: str
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return dict(self.details)


@dataclass(frozen=True)
class StartResult:
    """What Start Service did. ``reused``: a kept instance (container) was started again rather than created
    (None where the method has no such thing); ``previous``: the release that served before, if known."""

    ref: str  # container or unit name
    reused: bool | None = None
    previous: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    private_port: int | None = None  # behind an ingress proxy: where it listens until the switch

    def record(self) -> dict[str, Any]:
        return {**self.details, "reused_container": self.reused, "private_port": self.private_port}


@dataclass(frozen=True)
class Output:
    """A release's own last output lines, and the exit code its process last ended with (None: runs, or
    unknown)."""

    lines: list[str]
    exit_code: int | None = None
    reason: str | None = None  # why it stopped, in the runtime's words (a Swarm rollback), for the job's error


@dataclass(frozen=True)
class Removed:
    """What retention or prune removed from a host."""

    releases: list[str]
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {**self.details, "removed_releases": self.releases}


def env_file_text(env: dict[str, str]) -> bytes:
    """systemd EnvironmentFile / docker --env-file syntax; values were validated to hold no newline."""
    return "".join(f"{k}={v}\n" for k, v in sorted(env.items())).encode()


@dataclass(frozen=True)
class Drift:
    """A host's runtime reported something happening to one of this daemon's instances (its own event)."""

    service: str | None  # None: the watch (re)started listening; anything may have changed before it did
    what: str  # for humans: "docker: container deployerd-web-3f2a died (exit code 137)"
    release: str = ""  # the instance's release, where the event names it
    ref: str = ""  # the runtime's reference of the instance (a container id)


class StartError(Exception):
    """The release could not be started or stopped running; ``logs`` holds its last output lines."""

    def __init__(self, message: str, logs: list[str] | None = None) -> None:
        super().__init__(message)
        self.logs = logs or []


class Runtime(ABC):
    """A deployment method on one host, over that host's single SSH connection."""

    method: str

    def __init__(self, conn: Connection, host: HostSpec, instance: str = "default") -> None:
        self.conn = conn
        self.host = host
        self.instance = instance  # only this daemon instance's deployments are observed and touched

    def qualified(self, service: str) -> str:
        return qualified_name(service, self.instance)

    async def listening_ports(self) -> set[int]:
        """The TCP ports something listens on at the host, on any address: a new private port is none of them."""
        listening = await self.conn.run(["ss", "-Hltn"], check=False)
        return {int(port) for f in (line.split() for line in listening.stdout.splitlines())
                if len(f) >= 4 and (port := f[3].rsplit(":", 1)[-1]).isdigit()}

    def layout(self, service: str) -> Layout:
        return Layout(self.host.base_dir, self.qualified(service))

    def service_dir(self, service: str) -> str:
        return self.layout(service).service_dir

    def marker_path(self, service: str) -> str:
        return posixpath.join(self.service_dir(service), MARKER_FILE)

    def _marker_body(self, service: str) -> dict[str, str]:
        return {"created_by": "deployerd", "instance": self.instance, "service": service}

    async def _ownership(self, service: str) -> str:
        """"ours" (the marker of this instance and service), "absent" (no service dir) or why it is not ours.

        A dir from before markers existed is ours when deployerd's own traces prove it (an instance of this
        daemon for the service: labelled containers or its unit; or Transfer's release manifests): the marker
        is written then, once."""
        sdir = self.service_dir(service)
        try:
            found = json.loads(await self.conn.read_bytes(self.marker_path(service)))
        except RemoteFileError as e:
            if not e.not_found:
                raise
            found = None
        except ValueError:
            return f"{self.marker_path(service)} is not deployerd's marker (not JSON)"
        if found is not None:
            if not isinstance(found, dict):
                return f"{self.marker_path(service)} is not deployerd's marker"
            if (found.get("instance"), found.get("service")) == (self.instance, service):
                return "ours"
            return (f"{self.marker_path(service)} names instance {found.get('instance')!r} service "
                    f"{found.get('service')!r}, not {self.instance!r} {service!r}")
        if not (await self.conn.run(["test", "-e", sdir], check=False)).ok:
            return "absent"
        listed = await self.conn.run(["ls", "-1", "--", posixpath.join(sdir, "releases")], check=False)
        if await self.has_instances(service) or any(e.endswith(".manifest.json") for e in listed.stdout.split()):
            await self.conn.put_bytes(self.marker_path(service), json.dumps(self._marker_body(service)).encode())
            return "ours"
        return f"{sdir} holds no {MARKER_FILE} and nothing deployerd deployed"

    async def claim(self, service: str) -> None:
        """Before a deploy writes into the service dir: create it with its marker, or check it is ours."""
        why = await self._ownership(service)
        if why == "absent":
            await self.conn.makedirs(self.service_dir(service))
            await self.conn.put_bytes(self.marker_path(service), json.dumps(self._marker_body(service)).encode())
        elif why != "ours":
            raise ForeignDirectory(f"{self.service_dir(service)} on {self.host.name} was not created by deployerd "
                                   f"({why}); move it away or choose another base_dir")

    async def owned_dir(self, service: str) -> bool:
        """Before removing files of a service: True when its dir is ours, False when there is none; raises
        ForeignDirectory (and nothing may be removed) otherwise."""
        why = await self._ownership(service)
        if why not in ("ours", "absent"):
            raise ForeignDirectory(f"refusing to remove anything of {service} under {self.service_dir(service)} "
                                   f"on {self.host.name}: {why}; deployerd removes only what it created")
        return why == "ours"

    async def host_releases(self, service: str) -> set[str]:
        """Release ids that have files on the host (release dirs, partial transfers, manifests, venvs)."""
        listed = await self.conn.run(["ls", "-1", "--", *self.layout(service).release_folders], check=False)
        return {
            release_id(entry)
            for entry in listed.stdout.split()
            if not entry.endswith(":")  # ls prints a header per folder when given several
        } - {""}

    async def remove_release_files(self, service: str, releases: list[str]) -> None:
        """Delete every file of these releases on the host, whichever method made them, in one command, after
        one more that deletes the temp files of atomic writes a killed daemon left in the service's folders."""
        layout = self.layout(service)
        await self.remove_stale_temps(layout.written_folders)
        if not releases:
            return
        await self.conn.run(["rm", "-rf", "--", *(p for r in releases for p in layout.release_paths(r))])

    async def finish_retention(self, service: str, keep: list[str], removed: set[str], owned: bool,
                               on_host: set[str] | None = None) -> Removed:
        """The end of every method's retention: in a service dir of ours, the files of releases removed or not
        kept go too (``on_host``: ``host_releases`` as the caller already listed it)."""
        if owned:
            listed = await self.host_releases(service) if on_host is None else on_host
            removed |= {r for r in listed if r not in keep}
        stale = sorted(r for r in removed if r)
        if owned:
            await self.remove_release_files(service, stale)
        return Removed(stale)

    async def remove_stale_temps(self, folders: list[str], name: str = "*") -> None:
        """Delete the temp files of atomic writes to files named ``name`` (``temp_name_pattern``) directly in
        ``folders``.

        Only a SIGKILL between write and rename leaves one; called while the service's lock is held, so no
        write of ours to these folders is in flight. Missing folders are fine."""
        await self.conn.run(["find", *folders, "-maxdepth", "1", "-type", "f", "-name", temp_name_pattern(name),
                             "-delete"], check=False)

    async def close(self) -> None:  # noqa: B027 - optional hook: most runtimes hold nothing more
        """Release what the runtime holds beyond the connection (API clients)."""

    async def health_targets(self, ctx: ReleaseContext) -> list[tuple[str, str]]:
        """(address as seen from the host, name) of each place the release answers on its port, for Verify
        Health: the host's own loopback; every node running one of its tasks for a cluster."""
        return [("127.0.0.1", self.host.name)]

    async def registry_node(self, ctx: ReleaseContext) -> str | None:
        """The address the Registry endpoint names instead of the host's (a Swarm node running a task)."""
        return None

    @abstractmethod
    async def observe(self) -> tuple[list[Instance], dict[str, list[str]]]:
        """All deployerd instances on the host, and per service the release ids kept there (newest first)."""

    @abstractmethod
    async def has_instances(self, service: str) -> bool:
        """Does this daemon run (or keep) an instance of ``service`` here (a container or a unit of ours)?"""

    @abstractmethod
    async def has_artifact(self, ctx: ReleaseContext) -> bool:
        """Is the release already built on the host (image or environment)? Then Transfer and Build are skipped."""

    @abstractmethod
    async def build(self, ctx: ReleaseContext) -> BuildResult:
        """Build the release from its transferred files while the current release keeps serving."""

    @abstractmethod
    async def start(self, ctx: ReleaseContext) -> StartResult:
        """Make ``ctx``'s release the one that runs; the previous one is kept stopped for rollback."""

    @abstractmethod
    async def state(self, ctx: ReleaseContext) -> RunState | None:
        """Run state of one release (None: it does not exist)."""

    @abstractmethod
    async def logs(self, ctx: ReleaseContext, lines: int = 40) -> Output:
        """The release's own last output lines (since its latest start), attached to a failed job."""

    async def stop_others(self, ctx: ReleaseContext) -> list[str]:
        """Stop every running instance of the service but ``ctx``'s (kept for rollback): behind an ingress,
        once the proxy has switched to ``ctx`` and the old one drained. Returns what it stopped."""
        raise NotImplementedError(f"{self.method} cannot run behind an ingress proxy yet")

    async def stop_unproxied(self, ctx: ReleaseContext) -> list[str]:
        """Behind an ingress, before the proxy binds the public port: stop the service's instances that bind it
        themselves (deployed stop-first, before the host had the proxy). Returns what it stopped."""
        return []

    def watch(self) -> AsyncIterator[Drift]:
        """This daemon's instances' state changes on the host, as the runtime reports them, until the stream
        breaks: a ``Drift`` with no service first, once it listens (``hostwatch`` runs it)."""
        raise NotImplementedError(f"{self.method} reports no events")

    async def leave_ingress(self, qualified: str) -> dict[str, object]:
        """The service's route on the host's proxy goes, so its public port is free: before a stop-first start
        (a host that had the proxy, now ``ingress: none``) and before a removal. Nothing where the proxy never
        had it (one read)."""
        return await IngressProxy(self.conn, self.host.name).remove_route(qualified)

    async def start_unproxied(self, ctx: ReleaseContext, stopped: list[str]) -> None:  # noqa: B027 - optional
        """The proxy could not take the public port after all: what ``stop_unproxied`` stopped serves again."""

    @abstractmethod
    async def discard(self, ctx: ReleaseContext) -> None:
        """Stop and remove a failed release's running instance (its files stay until retention)."""

    @abstractmethod
    async def remove_service(self, service: str) -> Removed:
        """Prune: stop and remove every instance, artifact and file of a service."""

    @abstractmethod
    async def retain(self, service: str, keep: list[str]) -> Removed:
        """Remove the releases of ``service`` not in ``keep`` (instances, artifacts, release dirs)."""
