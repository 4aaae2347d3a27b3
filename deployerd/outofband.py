"""Out-of-band deploys (the older ``POST /deploy``): a folder of the daemon's machine deployed as a service
git does not manage. Its instances are labelled ``managed_by=api``; a name git manages is refused
(``Conflict``), so git stays the one source of what it owns.

They are first-class in reconcile all the same. The store is their source of truth: a row per service (its host
and the last release that deployed well, `store.OutOfBandService`) and that release's record (spec, env,
inputs). Every reconcile plans them with git's rules (`plan.plan_out_of_band`): one stopped by hand or unhealthy
is started again, a Registry that lost it gets it back. A commit never prunes them; `remove` does
(``DELETE /deploy/services/{name}``, ``deployerd remove NAME``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from deployerd.desired import DesiredState, HostSpec, ServiceSpec, source_release
from deployerd.observe import Hosts
from deployerd.observed import ObservedState
from deployerd.phases import Deployer
from deployerd.plan import Action, ActionKind
from deployerd.registry_client import RegistryError
from deployerd.runtimes import HostHandle, ReleaseContext
from deployerd.secrets import SecretError, Secrets
from deployerd.store import Job, JobStatus, OutOfBandService, Store
from deployerd.tree import DirTree

log = logging.getLogger(__name__)


class Conflict(Exception):
    """The request conflicts with what git manages (HTTP 409)."""


class OutOfBand:
    def __init__(self, secrets: Secrets, store: Store, hosts: Hosts, deployer: Deployer, instance: str,
                 busy: Callable[[str], bool], launch: Callable[[Job, Awaitable[Job]], None],
                 source_root: Path) -> None:
        self.secrets, self.store, self.hosts, self.deployer = secrets, store, hosts, deployer
        self.instance = instance
        self.source_root = source_root  # the API source directory: where a lost release is rebuilt from
        self._busy = busy  # a job for this service is in flight
        self._launch = launch  # queue a job's work

    async def wanted(self, desired: DesiredState) -> dict[str, ReleaseContext]:
        """Each out-of-band service's release that should run, on its host as hosts.yaml has it now."""
        out = {}
        for name, row in (await self.store.out_of_band()).items():
            rec = next((r for r in await self.store.releases(name) if r.release == row.release), None)
            if rec is None:
                log.warning("out-of-band service %s: no record of its release %s", name, row.release)
                continue
            ctx = await self.deployer.context_for(rec)
            host = desired.hosts.get(row.host)
            out[name] = dataclasses.replace(ctx, host=host) if host is not None else ctx
        return out

    async def deploy(self, spec: ServiceSpec, root: Path, desired: DesiredState | None,
                     request: dict[str, Any] | None = None, previous: str | None = None) -> Job:
        """Deploy ``spec.source`` under ``root`` on a host of ``desired`` (what git last said); returns the job,
        launched (``request``: the older API's request, kept on the job). Raises Conflict, or ValueError for a
        source the rules refuse."""
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
        if spec.env:  # an API caller's env often holds keys: a keyed digest, not a plain hash anyone can test
            release = release.with_input("env", await self.secrets.digest(spec.env))
        ctx = ReleaseContext(spec=spec, host=host, release=release, commit="", managed_by="api",
                             instance=self.instance, env={**spec.env, **secret_env})
        job = Job(service=spec.name, host=host.name, method=spec.method, trigger="api", managed_by="api",
                  release=release.id, reasons=["POST /deploy"], service_port=spec.port, droplet_id=spec.droplet_id,
                  service_url=ctx.endpoint, service_path=ctx.release_dir, request=request)
        await self.store.save_job(job)
        handle = await self.hosts.handle(host)
        self._launch(job, self._deploy(job, ctx, handle, tree, previous))
        return job

    async def _deploy(self, job: Job, ctx: ReleaseContext, handle: HostHandle, tree: DirTree,
                      previous: str | None) -> Job:
        """The six phases; a release that deployed well becomes the one reconciles keep running."""
        job = await self.deployer.deploy(job, ctx, handle, tree, previous=previous)
        if job.status is JobStatus.SUCCEEDED:
            await self.store.save_out_of_band(OutOfBandService(service=ctx.spec.name, host=ctx.host.name,
                                                               release=ctx.release.id))
        return job

    async def heal(self, job: Job, action: Action, ctx: ReleaseContext) -> Job:
        """Start the wanted release again (its kept container or unit). A release the host lost is rebuilt from
        its folder only while that still holds the files it was built from: nothing else defines it."""
        tree = DirTree(self.source_root)
        if not action.kept:
            try:
                now = await asyncio.to_thread(source_release, tree, ctx.spec, ctx.host,
                                              f"POST /deploy {ctx.spec.source}")
                same = now.inputs.get("source") == ctx.release.inputs.get("source")
            except (ValueError, OSError):
                same = False
            if not same:
                job.status = JobStatus.FAILED
                job.error = (f"release {ctx.release.id} of out-of-band service {ctx.spec.name} is no longer on "
                             f"{ctx.host.name} and its folder {ctx.spec.source} changed since: POST /deploy it again")
                await self.store.save_job(job)
                return job
        return await self._deploy(job, ctx, await self.hosts.handle(ctx.host), tree, action.current_release)

    async def remove(self, name: str, desired: DesiredState | None, observed: ObservedState | None) -> Job:
        """Remove an out-of-band service: its instances, artifacts, files and its own Registry entry; returns the
        job, launched. Raises Conflict (a name git manages, a job in flight) or KeyError (no such service)."""
        if desired is not None and (name in desired.services or name in desired.broken):
            raise Conflict(f"service {name} is managed by git; remove its manifest from the desired-state repository")
        if self._busy(name):
            raise Conflict(f"a job for {name} is already running")
        row = (await self.store.out_of_band()).get(name)
        found = [(h, i.method) for h, f in (observed.hosts.items() if observed else []) if f.reachable
                 for i in f.of_service(name) if i.managed_by == "api"]
        if row is not None:  # what the store says wins: the last observation may predate its deploy
            rec = next((r for r in await self.store.releases(name) if r.release == row.release), None)
            host_name, method = row.host, rec.method if rec else (found[0][1] if found else None)
        elif found:
            host_name, method = found[0]
        else:
            raise KeyError(f"no out-of-band service named {name!r}")
        host = desired.hosts.get(host_name) if desired else None
        deregister = await self._owns_entry(name, observed)
        job = Job(service=name, host=host_name, method=method or "docker", kind=ActionKind.PRUNE.value,
                  trigger="api", managed_by="api", reasons=[f"DELETE /deploy/services/{name}"])
        await self.store.save_job(job)
        await self.store.forget_out_of_band(name)  # first: no reconcile heals it back meanwhile
        self._launch(job, self._remove(job, host, method, deregister))
        return job

    async def _remove(self, job: Job, host: HostSpec | None, method: str | None, deregister: bool) -> Job:
        """A host down fails the job (transient); what is left is still found by its instances for another try."""
        handle = await self.hosts.handle(host) if host is not None and method else None
        return await self.deployer.prune(job, handle, method, deregister=deregister)

    async def _owns_entry(self, name: str, observed: ObservedState | None) -> bool:
        """Is the Registry's entry for ``name`` this daemon's out-of-band one? Asked now (the last observation
        may predate it); when the Registry cannot be read, what the last observation saw."""
        try:
            entry = await self.deployer.registry.get_by_name(name)
        except RegistryError:
            entry = (observed.registry or {}).get(name) if observed else None
        meta = (entry.metadata or {}) if entry else {}
        return meta.get("managed_by") == "deployerd-api" and meta.get("instance", "default") == self.instance
