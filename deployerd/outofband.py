"""Out-of-band deploys (the older ``POST /deploy``): a folder of the daemon's machine deployed as a service
git does not manage. Its instances are labelled ``managed_by=api``, so reconciles show them and never
prune them; a name git manages is refused (``Conflict``), so git stays the one source of what it owns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from deployerd.desired import DesiredState, ServiceSpec, source_release
from deployerd.observe import Hosts
from deployerd.phases import Deployer
from deployerd.runtimes import ReleaseContext
from deployerd.secrets import SecretError, Secrets
from deployerd.store import Job, Store
from deployerd.tree import DirTree


class Conflict(Exception):
    """The request conflicts with what git manages (HTTP 409)."""


class OutOfBand:
    def __init__(self, secrets: Secrets, store: Store, hosts: Hosts, deployer: Deployer, instance: str,
                 busy: Callable[[str], bool], launch: Callable[[Job, Awaitable[Job]], None]) -> None:
        self.secrets, self.store, self.hosts, self.deployer = secrets, store, hosts, deployer
        self.instance = instance
        self._busy = busy  # a job for this service is in flight
        self._launch = launch  # queue a job's work

    async def deploy(self, spec: ServiceSpec, root: Path, desired: DesiredState | None) -> Job:
        """Deploy ``spec.source`` under ``root`` on a host of ``desired`` (what git last said); returns the job,
        launched. Raises Conflict, or ValueError for a source the rules refuse."""
        if desired is not None and (spec.name in desired.services or spec.name in desired.broken):
            raise Conflict(f"service {spec.name} is managed by git; commit to the desired-state repository instead")
        if desired is None or spec.host not in desired.hosts:
            raise Conflict(f"host {spec.host} is not in hosts.yaml")
        if self._busy(spec.name):
            raise Conflict(f"a job for {spec.name} is already running")
        host = desired.hosts[spec.host]
        tree = DirTree(root)
        release = await asyncio.to_thread(source_release, tree, spec, host, f"POST /deploy {spec.source}")
        try:  # no repository here: only the secrets file
            secret_env = await self.secrets.resolve(spec, None)
        except (SecretError, OSError) as e:
            raise ValueError(str(e)) from None
        if spec.secrets:
            release = release.with_input("secrets", await self.secrets.digest(secret_env))
        ctx = ReleaseContext(spec=spec, host=host, release=release, commit="", managed_by="api",
                             instance=self.instance, env={**spec.env, **secret_env})
        job = Job(service=spec.name, host=host.name, method=spec.method, trigger="api", managed_by="api",
                  release=release.id, reasons=["POST /deploy"], service_port=spec.port, droplet_id=spec.droplet_id,
                  service_url=ctx.endpoint, service_path=ctx.release_dir)
        await self.store.save_job(job)
        handle = await self.hosts.handle(host)
        self._launch(job, self.deployer.deploy(job, ctx, handle, tree, previous=None))
        return job
