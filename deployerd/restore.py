"""Restore: deploy a past release again from its record (its kept artifact, or its own commit's files).

The planner asks for it when git wants a release that ran before (a ``git revert``): the release record
holds the spec, host and inputs it was deployed with, so it runs again as it was, its secrets resolved from
the current sources.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

from deployerd.desired import DesiredState, HostSpec
from deployerd.observe import Hosts
from deployerd.phases import Deployer, Registrar
from deployerd.plan import Action
from deployerd.secrets import SecretError
from deployerd.store import Job, Store
from deployerd.tree import GitTree


class Restorer:
    def __init__(self, store: Store, deployer: Deployer, hosts: Hosts,
                 tree_at: Callable[[str], Awaitable[GitTree]]) -> None:
        self.store, self.deployer, self.hosts, self.tree_at = store, deployer, hosts, tree_at

    async def restore(self, job: Job, action: Action, desired: DesiredState, register: Registrar | None = None) -> Job:
        """Run ``job`` for the RESTORE ``action``; a release that cannot be restored fails the job."""
        return await self.release_on(job, action.service, desired.hosts[action.host], action.release or "", register)

    async def release_on(self, job: Job, service: str, host: HostSpec, release: str,
                         register: Registrar | None = None) -> Job:
        """Run ``job``: ``release`` of ``service`` on ``host`` again (a fleet's rollback, with its ``register``;
        on a host new to the fleet, as it ran on the others)."""
        record = next((r for r in await self.store.releases(service) if r.release == release), None)
        if record is None:
            return await self.deployer.end_unstarted(job, f"no record of release {release}")
        if not record.commit:
            return await self.deployer.end_unstarted(job, f"release {release} has no commit to restore from")
        try:
            ctx = await self.deployer.context_for(record, host.name)
        except (SecretError, OSError) as e:
            return await self.deployer.end_unstarted(job, str(e))
        if host.name not in record.ran_on:
            ctx = dataclasses.replace(ctx, host=host)
        job.commit = record.commit
        tree = await self.tree_at(record.commit)
        try:
            handle = await self.hosts.handle(host)
            return await self.deployer.deploy(job, ctx, handle, tree, previous=None, register=register)
        finally:
            await asyncio.to_thread(tree.close)
