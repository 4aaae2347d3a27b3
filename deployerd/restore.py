"""Restore: deploy a past release again from its record (its kept artifact, or its own commit's files).

The planner asks for it when git wants a release that ran before (a ``git revert``): the release record
holds the spec, host and inputs it was deployed with, so it runs again as it was, its secrets resolved from
the current sources.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from deployerd.desired import DesiredState
from deployerd.observe import Hosts
from deployerd.phases import Deployer
from deployerd.plan import Action
from deployerd.secrets import SecretError
from deployerd.store import Job, Store
from deployerd.tree import GitTree


class Restorer:
    def __init__(self, store: Store, deployer: Deployer, hosts: Hosts,
                 tree_at: Callable[[str], Awaitable[GitTree]]) -> None:
        self.store, self.deployer, self.hosts, self.tree_at = store, deployer, hosts, tree_at

    async def restore(self, job: Job, action: Action, desired: DesiredState) -> Job:
        """Run ``job`` for the RESTORE ``action``; a release that cannot be restored fails the job."""
        record = next((r for r in await self.store.releases(action.service) if r.release == action.release), None)
        if record is None:
            return await self.deployer.end_unstarted(job, f"no record of release {action.release}")
        if not record.commit:
            return await self.deployer.end_unstarted(job, f"release {action.release} has no commit to restore from")
        try:
            ctx = await self.deployer.context_for(record)
        except (SecretError, OSError) as e:
            return await self.deployer.end_unstarted(job, str(e))
        job.commit = record.commit
        tree = await self.tree_at(record.commit)
        try:
            handle = await self.hosts.handle(desired.hosts[action.host])
            return await self.deployer.deploy(job, ctx, handle, tree, previous=None)
        finally:
            await asyncio.to_thread(tree.close)
