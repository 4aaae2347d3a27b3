"""Planning: one pinned look at the world (a ``Snapshot``) and the ``Planner`` that takes it.

A snapshot holds what git wants at one commit, what runs, the secret values its release ids were computed
from, the commit's files and the plan between them. Planning returns it and launching reads only it, so a
``deployerd plan`` (or any preview) never changes what a reconcile acts on. The planner keeps the one cache
that pays: the pinned commit's tree and its validated manifests, reused while the commit stays the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from deployerd.desired import DesiredState, HostSpec, load_desired
from deployerd.observe import Hosts, methods_by_host, observe, same_machine
from deployerd.observed import ObservedState
from deployerd.plan import Action, ActionKind, plan, plan_out_of_band, sort_key
from deployerd.registry_client import RegistryClient
from deployerd.runtimes import ReleaseContext
from deployerd.secrets import Secrets
from deployerd.source import GitSource, SourceError
from deployerd.store import Store
from deployerd.tree import GitTree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    desired: DesiredState
    observed: ObservedState
    tree: GitTree  # the commit's files, shared by the jobs launched from this snapshot
    secrets: Mapping[str, Mapping[str, str]] = field(repr=False)  # service -> values its release id used
    actions: list[Action]
    fetch_error: str | None = None  # git could not be fetched: this is the last good revision
    stages: Mapping[str, float] = field(default_factory=dict)  # seconds per planning stage
    # out-of-band services (the older POST /deploy) -> the release each should run
    out_of_band: Mapping[str, ReleaseContext] = field(default_factory=dict, repr=False)

    def out_of_band_context(self, action: Action) -> ReleaseContext | None:
        """The out-of-band release an action is about (None: the action is about a git service)."""
        if action.service in self.desired.services or action.kind is ActionKind.PRUNE:
            return None
        return self.out_of_band.get(action.service)


class _Stopwatch:
    """Seconds per stage, each from the end of the previous one."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._t0 = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.stages[name] = round(now - self._t0, 4)
        self._t0 = now


class Planner:
    """Fetch, load (validate, resolve secrets), observe, read quarantines, plan: a ``Snapshot``."""

    def __init__(self, source: GitSource, secrets: Secrets, hosts: Hosts, registry: RegistryClient, store: Store,
                 instance: str, idle: Callable[[], bool],
                 out_of_band: Callable[[DesiredState], Awaitable[Mapping[str, ReleaseContext]]] | None = None) -> None:
        self.source, self.secrets, self.hosts, self.registry, self.store = source, secrets, hosts, registry, store
        self.instance = instance
        self._idle = idle  # no job in flight: older trees can be closed
        self._out_of_band = out_of_band  # the out-of-band services' wanted releases (from the store)
        self._tree: GitTree | None = None  # the pinned commit's files
        self._retired: list[GitTree] = []  # older commits' trees, closed once no job may read them
        self._loaded: DesiredState | None = None  # as validated from git, before secrets are resolved
        self._closing: set[asyncio.Task[None]] = set()
        self._invalid: set[str] = set()  # the validation errors last logged
        self._asked: _Asked | None = None  # what the last look asked the hosts for

    @property
    def tree(self) -> GitTree | None:
        """The files of the commit the daemon follows (None before the first snapshot)."""
        return self._tree

    async def snapshot(self, force: set[str] | None = None, interrupted: Mapping[str, str] | None = None,
                       prune_all: bool = False) -> Snapshot:
        """One look and its plan. ``force`` names services whose quarantine is ignored (empty: all);
        ``prune_all`` lets a commit that removes every service prune them."""
        clock = _Stopwatch()
        early = self._observe_early()
        try:
            return await self._snapshot(clock, early, force, interrupted, prune_all)
        finally:
            if early is not None and not early.task.done():  # the commit could not be loaded: nobody awaits it
                early.task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _snapshot(self, clock: _Stopwatch, early: _Early | None, force: set[str] | None,
                        interrupted: Mapping[str, str] | None, prune_all: bool) -> Snapshot:
        fetch_error = None
        try:
            revision = await self.source.fetch()
        except SourceError as e:
            if self.source.revision is None:
                raise
            fetch_error = str(e)
            revision = self.source.revision  # keep reconciling the last good revision while git is down
            log.warning("git fetch failed, using %s: %s", revision[:12], e)
        clock.lap("fetch")
        tree = await self._tree_for(revision)
        if self._loaded is not None and self._loaded.revision == revision:
            loaded = self._loaded  # same commit, same files: validation and release ids cannot differ
        else:
            # the services of the last applied commit: a newcomer clashing with one of them is the one blocked
            before = self._loaded.services if self._loaded is not None else None
            loaded = self._loaded = await asyncio.to_thread(load_desired, tree, revision, before)
            self._log_invalid(loaded)
        # secrets are resolved every time: a value rotated in the secrets file needs no commit
        desired, secret_env = await self.secrets.apply(loaded, tree)
        clock.lap("load")  # desired state and secrets
        oob = await self._out_of_band(desired) if self._out_of_band else {}
        observed = await self._observe(early, _Asked(desired.hosts, _methods(desired, oob)))
        clock.lap("observe")  # what is left of it once git is loaded
        quarantined = await self._quarantined(force)
        last_good = await self._last_good(quarantined)
        clock.lap("store")
        actions = self._plan(desired, observed, oob, quarantined, interrupted, prune_all, last_good)
        clock.lap("plan")
        return Snapshot(desired=desired, observed=observed, tree=tree, secrets=secret_env, actions=actions,
                        fetch_error=fetch_error, stages=clock.stages, out_of_band=oob)

    async def look_again(self, snap: Snapshot, host: str, interrupted: Mapping[str, str] | None = None) -> Snapshot:
        """``snap`` with one host observed again and everything planned again on those facts (a heal after that
        host's own event): no fetch, no load, no other host, the Registry as ``snap`` read it. The desired state
        is the one the last reconcile acts on, so this plans nothing that reconcile would not."""
        clock = _Stopwatch()
        spec = snap.desired.hosts[host]
        facts = await self.hosts.facts(spec, _methods(snap.desired, snap.out_of_band).get(host, ()))
        hosts = same_machine({**snap.observed.hosts, host: facts})
        observed = snap.observed.model_copy(update={"hosts": hosts})
        clock.lap("observe")
        quarantined = await self._quarantined(None)
        actions = self._plan(snap.desired, observed, snap.out_of_band, quarantined, interrupted, False,
                             await self._last_good(quarantined))
        clock.lap("plan")
        return dataclasses.replace(snap, observed=observed, actions=actions, stages=clock.stages)

    def _observe_early(self) -> _Early | None:
        """Start reading the hosts the last look asked for, as it asked, while git is fetched and loaded (neither
        needs a host): a commit that leaves hosts.yaml and the services' places alone asks the same."""
        if self._asked is None:
            return None
        asked = self._asked
        return _Early(asked, asyncio.create_task(observe(self.hosts, asked.specs, self.registry, asked.methods),
                                                 name="observe while git loads"))

    async def _observe(self, early: _Early | None, asked: _Asked) -> ObservedState:
        """The observation ``asked`` for: the early one when it asked the same, else one started now (the early
        one is let finish first: a look is never cut short mid-host)."""
        self._asked = asked
        if early is not None:
            observed = await early.task
            if early.asked == asked:
                return observed
        return await observe(self.hosts, asked.specs, self.registry, asked.methods)

    async def _quarantined(self, force: set[str] | None) -> dict[str, str]:
        return {s: q.release for s, q in (await self.store.quarantined()).items()
                if force is None or (force and s not in force)}

    async def _last_good(self, quarantined: Mapping[str, str]) -> dict[str, str]:
        """service -> its last good release, for the quarantined ones only (a fleet's hosts go back to it from the
        rejected release): one store read per quarantine, none in the usual case."""
        out: dict[str, str] = {}
        for service, rejected in quarantined.items():
            if (rec := await self.store.last_good(service, exclude=rejected)) is not None:
                out[service] = rec.release
        return out

    def _plan(self, desired: DesiredState, observed: ObservedState, oob: Mapping[str, ReleaseContext],
              quarantined: Mapping[str, str], interrupted: Mapping[str, str] | None, prune_all: bool,
              last_good: Mapping[str, str]) -> list[Action]:
        actions = plan(desired, observed, quarantined, instance=self.instance, interrupted=interrupted,
                       prune_all=prune_all, last_good=last_good)
        if oob:  # healed and registered again like git's, never pruned by a commit
            wanted = {n: (c.spec, c.release) for n, c in oob.items()}
            actions = sorted(actions + plan_out_of_band(wanted, desired, observed, quarantined, self.instance),
                             key=sort_key)
        return actions

    def _log_invalid(self, loaded: DesiredState) -> None:
        """A WARNING per validation error when it appears, once (not at every reconcile of the same files)."""
        errors = {str(e) for e in loaded.errors}
        for line in sorted(errors - self._invalid):
            log.warning("invalid desired state at %s: %s", loaded.revision[:12], line)
        if self._invalid and not errors:
            log.info("desired state valid again at %s", loaded.revision[:12])
        self._invalid = errors

    async def _tree_for(self, revision: str) -> GitTree:
        if self._tree is None or self._tree.revision != revision:
            if self._tree is not None:
                self._retired.append(self._tree)
            self._tree = await asyncio.to_thread(GitTree, self.source.repo_path, revision)
            self.close_retired()
        return self._tree

    async def tree_at(self, commit: str) -> GitTree:
        """The files of any fetched commit (the caller closes it)."""
        return await asyncio.to_thread(GitTree, self.source.repo_path, commit)

    def close_retired(self) -> None:
        """Close older commits' trees (ending their git helper processes) once no job can read them."""
        if self._idle() and self._retired:
            trees, self._retired = self._retired, []
            task = asyncio.ensure_future(asyncio.to_thread(_close_all, trees))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every tree (call once no job runs)."""
        if self._tree is not None:
            self._retired.append(self._tree)
            self._tree = None
        self.close_retired()
        await asyncio.gather(*self._closing, return_exceptions=True)


@dataclass(frozen=True)
class _Asked:
    """What a look asks the hosts for: each host's address and the runtimes it is asked for."""

    specs: dict[str, HostSpec]
    methods: dict[str, set[str]]


@dataclass(frozen=True)
class _Early:
    asked: _Asked
    task: asyncio.Task[ObservedState]


def _methods(desired: DesiredState, oob: Mapping[str, ReleaseContext]) -> dict[str, set[str]]:
    """host -> the runtimes of the services (git's, on each host of a fleet, and out-of-band) placed on it: what
    observation asks for."""
    placed = [(h, s.method) for s in desired.services.values() for h in s.placed_on]
    placed += [(c.spec.host, c.spec.method) for c in oob.values()]
    return methods_by_host(placed)


def _close_all(trees: list[GitTree]) -> None:
    for tree in trees:
        tree.close()
