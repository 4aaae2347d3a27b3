"""The one interface the phases drive, whatever runs the service (a Docker container or a systemd unit).

The planner, the phase runner, rollback and metrics never ask which method they drive: they call these
methods. Each implementation reads its facts in a constant number of round trips per host (not per service),
so a reconcile that finds nothing to do stays cheap as services grow.
"""

from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from deployerd.connection import Connection, temp_name_pattern
from deployerd.desired import HostSpec, Release, ServiceSpec
from deployerd.observed import Instance, RunState

LABEL_PREFIX = "deployerd."


def qualified_name(service: str, instance: str) -> str:
    """The service's name on a host: plain for the default instance, prefixed by any other instance's name,
    so two daemons sharing a host never collide on container, image, unit or directory names."""
    return service if instance == "default" else f"{instance}-{service}"


@dataclass(frozen=True)
class ReleaseContext:
    """Everything one release of one service needs on its host; where its files live there."""

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
    def service_dir(self) -> str:
        return posixpath.join(self.host.base_dir, self.qualified_name)

    @property
    def release_dir(self) -> str:
        return posixpath.join(self.service_dir, "releases", self.release.id)

    @property
    def env_file(self) -> str:
        """Outside the release dir, so a Dockerfile's ``COPY .`` can never bake secrets into an image."""
        return posixpath.join(self.service_dir, "env", f"{self.release.id}.env")

    @property
    def endpoint(self) -> str:
        return f"http://{self.host.public_address or self.host.address}:{self.spec.port}"

    def labels(self) -> dict[str, str]:
        import json

        return {
            f"{LABEL_PREFIX}instance": self.instance,
            f"{LABEL_PREFIX}service": self.spec.name,
            f"{LABEL_PREFIX}release": self.release.id,
            f"{LABEL_PREFIX}commit": self.commit,
            f"{LABEL_PREFIX}managed_by": self.managed_by,
            f"{LABEL_PREFIX}port": str(self.spec.port),
            f"{LABEL_PREFIX}inputs": json.dumps(self.release.inputs, sort_keys=True),
        }


def env_file_text(env: dict[str, str]) -> bytes:
    """systemd EnvironmentFile / docker --env-file syntax; values were validated to hold no newline."""
    return "".join(f"{k}={v}\n" for k, v in sorted(env.items())).encode()


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

    def service_dir(self, service: str) -> str:
        return posixpath.join(self.host.base_dir, self.qualified(service))

    async def host_releases(self, service: str) -> set[str]:
        """Release ids that have files on the host (release dirs, partial transfers, manifests, venvs)."""
        sdir = self.service_dir(service)
        listed = await self.conn.run(
            ["ls", "-1", "--", posixpath.join(sdir, "releases"), posixpath.join(sdir, "venvs")], check=False
        )
        return {
            entry.removesuffix(".manifest.json").removesuffix(".partial")
            for entry in listed.stdout.split()
            if not entry.endswith(":")  # ls prints a header per folder when given two
        } - {""}

    async def remove_release_files(self, service: str, releases: list[str]) -> None:
        """Delete every file of these releases on the host, whichever method made them, in one command, after
        one more that deletes the temp files of atomic writes a killed daemon left in the service's folders."""
        sdir = self.service_dir(service)
        await self.remove_stale_temps([sdir, posixpath.join(sdir, "releases"), posixpath.join(sdir, "env")])
        if not releases:
            return
        paths = []
        for r in releases:
            paths += [
                posixpath.join(sdir, "releases", r),
                posixpath.join(sdir, "releases", f"{r}.partial"),
                posixpath.join(sdir, "releases", f"{r}.manifest.json"),
                posixpath.join(sdir, "venvs", r),
                posixpath.join(sdir, "env", f"{r}.env"),
            ]
        await self.conn.run(["rm", "-rf", "--", *paths])

    async def finish_retention(self, service: str, keep: list[str], removed: set[str]) -> dict[str, Any]:
        """The end of every method's retention: the files of releases removed or not kept go too."""
        removed |= {r for r in await self.host_releases(service) if r not in keep}
        stale = sorted(r for r in removed if r)
        await self.remove_release_files(service, stale)
        return {"removed_releases": stale}

    async def remove_stale_temps(self, folders: list[str], name: str = "*") -> None:
        """Delete the temp files of atomic writes to files named ``name`` (``temp_name_pattern``) directly in
        ``folders``.

        Only a SIGKILL between write and rename leaves one; called while the service's lock is held, so no
        write of ours to these folders is in flight. Missing folders are fine."""
        await self.conn.run(["find", *folders, "-maxdepth", "1", "-type", "f", "-name", temp_name_pattern(name),
                             "-delete"], check=False)

    async def close(self) -> None:
        """Release what the runtime holds beyond the connection (API clients)."""

    async def health_targets(self, service: str, release: str) -> list[tuple[str, str]]:
        """(address as seen from the host, name) of each place the release answers on its port: the host's
        own loopback here; each task's node for a cluster."""
        return [("127.0.0.1", self.host.name)]

    @abstractmethod
    async def observe(self) -> tuple[list[Instance], dict[str, list[str]]]:
        """All deployerd instances on the host, and per service the release ids kept there (newest first)."""

    @abstractmethod
    async def has_artifact(self, ctx: ReleaseContext) -> bool:
        """Is the release already built on the host (image or environment)? Then Build is skipped."""

    @abstractmethod
    async def build(self, ctx: ReleaseContext) -> dict[str, Any]:
        """Build the release from its transferred files while the current release keeps serving."""

    @abstractmethod
    async def start(self, ctx: ReleaseContext) -> dict[str, Any]:
        """Make ``ctx``'s release the one that runs; the previous one is kept stopped for rollback."""

    @abstractmethod
    async def state(self, service: str, release: str) -> RunState | None:
        """Run state of one release (None: it does not exist)."""

    @abstractmethod
    async def logs(self, service: str, release: str, lines: int = 40) -> list[str]:
        """Last output lines of one release, attached to a failed job."""

    @abstractmethod
    async def discard(self, service: str, release: str) -> None:
        """Stop and remove a failed release's running instance (its files stay until retention)."""

    @abstractmethod
    async def remove_service(self, service: str) -> dict[str, Any]:
        """Prune: stop and remove every instance, artifact and file of a service."""

    @abstractmethod
    async def retain(self, service: str, keep: list[str]) -> dict[str, Any]:
        """Remove the releases of ``service`` not in ``keep`` (instances, artifacts, release dirs)."""
