"""The planner's rules for one service on one host: the Action kinds, and the one action a host needs.

Pure, like the planner (``plan.py``) that applies them to every service: a one-host service on its host, a
fleet (``plan_fleet.py``) on each of its hosts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum

from pydantic import BaseModel, Field

from deployerd.desired import Release, ServiceSpec
from deployerd.observed import HostFacts, Instance, ObservedState, RunState


class ActionKind(StrEnum):
    DEPLOY = "deploy"
    REGISTER = "register"
    PRUNE = "prune"
    NOOP = "noop"
    BLOCKED = "blocked"
    RESTORE = "restore"  # the desired release is quarantined and the last good one stopped: restart that


_ORDER = {ActionKind.PRUNE: 0, ActionKind.DEPLOY: 1, ActionKind.RESTORE: 1, ActionKind.REGISTER: 2,
          ActionKind.BLOCKED: 3, ActionKind.NOOP: 4}

INPUT_LABELS = {  # Release.inputs key -> how a reason names it
    "source": "source files",
    "image": "build settings",
    "env": "env",
    "port": "port",
    "health": "health check",
    "host": "host settings",
    "ingress": "ingress",
    "swarm": "swarm settings",
}


class Action(BaseModel):
    """One planned step for one service on one host."""

    service: str
    host: str
    kind: ActionKind
    reasons: list[str] = Field(default_factory=list)
    release: str | None = None  # desired release id
    current_release: str | None = None  # observed current release id
    kept: bool = False  # desired release is kept on the host: restore it, no rebuild
    # a fleet's DEPLOY or RESTORE: its wave (0 the canary, then batches from 1); None for anything else
    wave: int | None = None


def sort_key(action: Action) -> tuple[int, str, int, str]:
    return (_ORDER[action.kind], action.service, -1 if action.wave is None else action.wave, action.host)


def unreachable(observed: ObservedState, host: str, methods: Iterable[str] = ()) -> str | None:
    """Why ``host`` (or its runtimes ``methods``) cannot be acted on, or None when they were observed."""
    facts = observed.hosts.get(host)
    if facts is None:
        return f"host {host} unreachable: not observed"
    if not facts.reachable:
        return f"host {host} unreachable: {facts.error or 'unknown error'}"
    return next((why for m in methods if (why := facts.unknown(m)) is not None), None)


def current_managed(facts: HostFacts, service: str, managed_by: str = "git") -> Instance | None:
    mine = [i for i in facts.of_service(service) if i.current and i.managed_by == managed_by]
    running = [i for i in mine if i.state is RunState.RUNNING]
    return running[0] if running else (mine[0] if mine else None)


def current_release(observed: ObservedState, host: str, service: str) -> str | None:
    inst = current_managed(observed.hosts[host], service)
    return inst.release if inst else None


def _changed(inst: Instance, release: Release) -> list[str]:
    """Which inputs differ between what runs and what git wants, named for humans."""
    if not inst.inputs:
        return [f"release {inst.release}"]
    keys = sorted(set(inst.inputs) | set(release.inputs), key=lambda k: (list(INPUT_LABELS).index(k)
                                                                         if k in INPUT_LABELS else 99, k))
    diff = [INPUT_LABELS.get(k, k) for k in keys if inst.inputs.get(k) != release.inputs.get(k)]
    return diff or [f"release {inst.release}"]


def plan_host(spec: ServiceSpec, host: str, release: Release, observed: ObservedState, quarantined: str | None,
              force: bool, interrupted: str | None, managed_by: str, elsewhere: list[str],
              registry: Callable[[], str | None], last_good: str | None = None) -> Action:
    """The one action ``host`` needs for ``spec`` to run ``release`` there (``registry``: why the Registry entry
    needs writing, None when it is right or not this host's to check). ``last_good``: a fleet's release to go back
    to from one the fleet rejected. A fleet host's own inputs (``Release.per_host``) are outside the id and not
    compared: an instance is named by its release id, so deploying the same id again would reuse it unchanged."""
    base = {"service": spec.name, "host": host, "release": release.id}
    if (why := unreachable(observed, host, [spec.method])) is not None:
        return Action(kind=ActionKind.BLOCKED, reasons=[why], **base)
    facts = observed.hosts[host]
    inst = current_managed(facts, spec.name, managed_by)
    current = inst.release if inst else None
    if spec.fleet and quarantined == release.id and not force and inst is not None and inst.release == release.id:
        return _back_to_last_good(spec.name, host, release.id, last_good, facts)

    reasons: list[str] = []
    if inst is None:
        if any(i.managed_by != managed_by for i in facts.of_service(spec.name)):
            other = "an out-of-band" if managed_by == "git" else "a git-managed"
            return Action(kind=ActionKind.BLOCKED, current_release=None, reasons=[
                f"{other} instance of {spec.name} runs on {host}; left untouched"], **base)
        where = f"cluster {spec.cluster} (removed by hand, or never deployed)" if spec.method == "swarm" else host
        reasons.append(f"not deployed on {where}" + (f" (moving from {', '.join(elsewhere)})" if elsewhere else ""))
    else:
        if inst.release != release.id:
            reasons.append("changed: " + ", ".join(_changed(inst, release)))
            if inst.note:  # Swarm rolled back by itself, after the deploy's own verdict
                reasons.append(inst.note)
        if inst.state is not RunState.RUNNING:
            reasons.append(f"not running ({inst.state.value})")
        elif inst.healthy is False:
            reasons.append("unhealthy")
        if inst.drift:  # a Swarm service scaled or updated by hand
            reasons.append(inst.drift)
        others = [i for i in facts.of_service(spec.name) if i.state is RunState.RUNNING and i is not inst
                  and i.managed_by == "git"]
        if others:  # an interrupted switch behind an ingress: finish it, so one instance serves
            reasons.append(f"{len(others)} more instance(s) running ({', '.join(i.release for i in others)})")
        if inst.release == release.id and interrupted == release.id:
            reasons.append("its deploy was interrupted (daemon stopped): verify, register and retain it again")

    if reasons:
        if quarantined == release.id and not force:
            why = f"release {release.id} quarantined after a failed deploy; waiting for git to change"
            if inst is not None and inst.release != release.id and inst.state is not RunState.RUNNING:
                # what serves meanwhile is the last good release: drift on it is healed like any other
                return Action(kind=ActionKind.RESTORE, service=spec.name, host=host, release=inst.release,
                              current_release=current, kept=True,
                              reasons=[why, f"last good release {inst.release} not running ({inst.state.value}): "
                                            "restart it"])
            return Action(kind=ActionKind.BLOCKED, current_release=current, reasons=[why], **base)
        kept = release.id in facts.releases_kept.get(spec.name, []) and (inst is None or inst.release != release.id
                                                                      or inst.state is not RunState.RUNNING)
        if kept:
            reasons.append("kept release, no rebuild")
        if registry() == "registry entry missing":
            reasons.append("registry entry missing")  # the Register phase of the deploy writes it
        return Action(kind=ActionKind.DEPLOY, current_release=current, reasons=reasons, kept=kept, **base)
    if (reg := registry()) is not None:
        return Action(kind=ActionKind.REGISTER, current_release=current, reasons=[reg], **base)
    return Action(kind=ActionKind.NOOP, current_release=current, reasons=["in sync"], **base)


def _back_to_last_good(service: str, host: str, rejected: str, last_good: str | None, facts: HostFacts) -> Action:
    """A host still serving a release its fleet rejected (a fleet rollback cut short): back to the last good one."""
    why = f"release {rejected} rejected by the fleet (quarantined)"
    if last_good is None or last_good == rejected:
        return Action(service=service, host=host, kind=ActionKind.BLOCKED, release=rejected, current_release=rejected,
                      reasons=[f"{why}; no last good release to go back to: waiting for git to change"])
    return Action(service=service, host=host, kind=ActionKind.RESTORE, release=last_good, current_release=rejected,
                  kept=last_good in facts.releases_kept.get(service, []),
                  reasons=[f"{why}: back to last good {last_good}"])
