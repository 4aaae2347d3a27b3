"""Pure data for ``method: swarm``: the Swarm service spec of a release, what an observed service says, and
the verdict on an update. No I/O, so each rule is a table test (tests/unit/test_swarm_spec.py).

Swarm keeps only a service's spec, so deployerd writes beside it what it set: a digest of the spec (a
service updated by hand, an env added or the image swapped, reads back with another digest), the replica
count (a service scaled by hand shows another count), and in the task template a digest of that template,
which every task created from it carries: "every task runs the new spec" is then a comparison, and a
change that leaves the template alone (replicas, rollout) restarts no task.

Images and task containers carry their own label keys (``deployerd.swarm.*``): a task container labelled
``deployerd.service`` would look like a ``method: docker`` instance to the Docker runtime of its node.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from deployerd.observed import Instance, RunState
from deployerd.runtimes.base import LABEL_PREFIX, ReleaseContext
from deployerd.schema import Release, ServiceSpec

SERVICE_LABEL = f"{LABEL_PREFIX}service"
INSTANCE_LABEL = f"{LABEL_PREFIX}instance"
RELEASE_LABEL = f"{LABEL_PREFIX}release"
SPEC_LABEL = f"{LABEL_PREFIX}spec"  # digest of what deployerd set (spec_digest)
REPLICAS_LABEL = f"{LABEL_PREFIX}replicas"  # "global" or the number set
IMAGE_SERVICE_LABEL = f"{LABEL_PREFIX}swarm.service"
IMAGE_INSTANCE_LABEL = f"{LABEL_PREFIX}swarm.instance"
IMAGE_RELEASE_LABEL = f"{LABEL_PREFIX}swarm.release"  # on images: the release that built it
TASK_LABEL = f"{LABEL_PREFIX}swarm.task"  # in the task template: its digest (task_digest)

ROLLED_BACK = ("rollback_started", "rollback_paused", "rollback_completed")
PAUSED = ("paused", "rollback_paused")
NS = 1_000_000_000


def build_tag(release: Release) -> str:
    """The image tag: a digest of what the image is built from (source files, build settings), so a change
    of replicas, env or rollout updates the service with the image it already has (no transfer, no build)."""
    blob = f"source={release.inputs.get('source', '')}\nimage={release.inputs.get('image', '')}\n"
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def image_ref(registry: str, qualified: str, release: Release) -> str:
    return f"{registry}/deployerd/{qualified}:{build_tag(release)}"


def image_labels(ctx: ReleaseContext) -> dict[str, str]:
    """The built image's labels (retention finds a service's images by them)."""
    return {IMAGE_SERVICE_LABEL: ctx.qualified_name, IMAGE_INSTANCE_LABEL: ctx.instance,
            IMAGE_RELEASE_LABEL: ctx.release.id}


def _update_config(spec: ServiceSpec, failure_action: str, order: str | None = None) -> dict[str, Any]:
    r = spec.rollout
    return {"Parallelism": r.parallelism, "Delay": int(r.delay_s * NS), "FailureAction": failure_action,
            "Monitor": int(r.monitor_s * NS), "MaxFailureRatio": r.max_failure_ratio, "Order": order or r.order}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def task_digest(template: Mapping[str, Any]) -> str:
    """A digest of a task template as deployerd sends it (without its own label)."""
    cs = dict(template.get("ContainerSpec") or {})
    labels = {k: v for k, v in (cs.get("Labels") or {}).items() if k != TASK_LABEL}
    return _digest({**template, "ContainerSpec": {**cs, "Labels": labels}})


def service_spec(ctx: ReleaseContext, image: str) -> dict[str, Any]:
    """The ServiceSpec (Docker Engine API) that runs ``ctx``'s release, its labels included."""
    spec = ctx.spec
    replicas = spec.swarm_replicas
    template: dict[str, Any] = {
        "ContainerSpec": {
            "Image": image,
            "Env": [f"{k}={v}" for k, v in sorted(ctx.env.items())],
            "Labels": {IMAGE_SERVICE_LABEL: ctx.qualified_name, IMAGE_INSTANCE_LABEL: ctx.instance},
            "Init": True,  # as for containers: SIGTERM reaches a server that would ignore it as PID 1
        },
        "Placement": {"Constraints": list(spec.placement.constraints)},
        "RestartPolicy": {"Condition": "any", "Delay": 2 * NS, "MaxAttempts": 0},
    }
    template["ContainerSpec"]["Labels"][TASK_LABEL] = task_digest(template)
    body: dict[str, Any] = {
        "Name": ctx.qualified_name,
        "TaskTemplate": template,
        "Mode": {"Global": {}} if replicas is None else {"Replicated": {"Replicas": replicas}},
        "UpdateConfig": _update_config(spec, spec.rollout.failure_action),
        # Swarm's rollback replaces failing tasks: in host mode stop-first, since a good task started beside
        # a failing one (that keeps restarting on its node's port) may find no node with the port free
        "RollbackConfig": _update_config(spec, "pause", "stop-first" if spec.publish_mode == "host" else None),
        "EndpointSpec": {"Mode": "vip", "Ports": [{"Protocol": "tcp", "TargetPort": spec.container_port,
                                                   "PublishedPort": spec.port, "PublishMode": spec.publish_mode}]},
    }
    labels = {**ctx.labels(), REPLICAS_LABEL: "global" if replicas is None else str(replicas),
              SPEC_LABEL: spec_digest(body)}
    return {**body, "Labels": labels}


def _g(d: Any, *keys: str, default: Any = None) -> Any:
    """A nested field of an API answer (Swarm omits zero values)."""
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return default
        d = d[k]
    return d


def spec_digest(spec: Mapping[str, Any]) -> str:
    """A digest of the fields deployerd sets, except the replica count (compared on its own), normalised
    so a spec read back from Swarm (zero values omitted, defaults added) digests as the one sent."""
    cs = _g(spec, "TaskTemplate", "ContainerSpec", default={})

    def policy(key: str) -> list[Any]:
        u = _g(spec, key, default={})
        return [u.get("Parallelism", 0), u.get("Delay", 0), u.get("FailureAction", "pause"), u.get("Monitor", 0),
                float(u.get("MaxFailureRatio", 0)), u.get("Order", "stop-first")]

    ports = [[p.get("Protocol", "tcp"), p.get("TargetPort"), p.get("PublishedPort"), p.get("PublishMode", "ingress")]
             for p in _g(spec, "EndpointSpec", "Ports", default=[])]
    return _digest({
        "image": cs.get("Image"), "env": sorted(cs.get("Env") or []), "init": bool(cs.get("Init")),
        "container_labels": dict(sorted((cs.get("Labels") or {}).items())),
        "constraints": sorted(_g(spec, "TaskTemplate", "Placement", "Constraints", default=[]) or []),
        "restart": _g(spec, "TaskTemplate", "RestartPolicy", "Condition", default="any"),
        "global": "Global" in (spec.get("Mode") or {}),
        "update": policy("UpdateConfig"), "rollback": policy("RollbackConfig"), "ports": sorted(ports),
    })


def replicas_of(spec: Mapping[str, Any]) -> str:
    """"global" or the replica count of a spec, in the form of REPLICAS_LABEL."""
    mode = spec.get("Mode") or {}
    return "global" if "Global" in mode else str(_g(mode, "Replicated", "Replicas", default=1))


def rolled_back(service: Mapping[str, Any]) -> str | None:
    """Swarm's own rollback of the service's last update, named for the plan's reason (seen after the deploy
    ended: the service runs the spec from before, with its release)."""
    state = _g(service, "UpdateStatus", "State", default="")
    if state not in ROLLED_BACK:
        return None
    failed = _g(service, "PreviousSpec", "Labels", RELEASE_LABEL, default="?")
    message = _g(service, "UpdateStatus", "Message", default="")
    return f"Swarm rolled back release {failed} by itself ({state}: {message})"


def drift(service: Mapping[str, Any]) -> str | None:
    """What was done to a service by hand (or a paused update), named for the plan's reason; None if nothing."""
    spec = service.get("Spec") or {}
    labels = spec.get("Labels") or {}
    state = _g(service, "UpdateStatus", "State", default="")
    if state in PAUSED:
        return f"Swarm {state.replace('_', ' ')} its update ({_g(service, 'UpdateStatus', 'Message', default='')})"
    want, have = labels.get(REPLICAS_LABEL), replicas_of(spec)
    if want is not None and want != have:
        return f"scaled by hand to {have} replicas (deployerd set {want})"
    if labels.get(SPEC_LABEL) != spec_digest(spec):
        return "updated by hand (its spec differs from the one deployerd set)"
    return None


def running_nodes(service: Mapping[str, Any], tasks: list[Mapping[str, Any]],
                  nodes: Mapping[str, str]) -> list[str]:
    """Addresses (``nodes``: node id -> address) of the nodes where a task of ``service``'s spec runs."""
    digest = _g(service, "Spec", "TaskTemplate", "ContainerSpec", "Labels", TASK_LABEL)
    return sorted({nodes[t["NodeID"]] for t in tasks if t.get("ServiceID") == service.get("ID")
                   and _g(t, "Status", "State") == "running" and t.get("NodeID") in nodes
                   and _g(t, "Spec", "ContainerSpec", "Labels", TASK_LABEL) == digest})


def instance_of(service: Mapping[str, Any], nodes: list[str], host: str) -> Instance:
    """The observed Instance of one Swarm service; ``nodes``: where a task of its spec runs (`running_nodes`)."""
    spec = service.get("Spec") or {}
    labels = spec.get("Labels") or {}
    try:
        inputs = json.loads(labels.get(f"{LABEL_PREFIX}inputs", "{}"))
    except ValueError:
        inputs = {}
    port = labels.get(f"{LABEL_PREFIX}port", "")
    paused = _g(service, "UpdateStatus", "State", default="") in PAUSED
    state = RunState.FAILED if paused or (not nodes and replicas_of(spec) != "0") else RunState.RUNNING
    return Instance(service=labels.get(SERVICE_LABEL, ""), host=host, method="swarm",
                    release=labels.get(RELEASE_LABEL, ""), commit=labels.get(f"{LABEL_PREFIX}commit", ""),
                    state=state, ref=str(service.get("ID", ""))[:12], port=int(port) if port.isdigit() else None,
                    managed_by=labels.get(f"{LABEL_PREFIX}managed_by", "git"), current=True,
                    inputs=inputs if isinstance(inputs, dict) else {}, drift=drift(service),
                    note=rolled_back(service), nodes=nodes)


def kept_releases(service: Mapping[str, Any]) -> list[str]:
    """The releases Swarm holds for a service: its spec's, then its previous spec's (its own rollback)."""
    out = [_g(service, "Spec", "Labels", RELEASE_LABEL, default=""),
           _g(service, "PreviousSpec", "Labels", RELEASE_LABEL, default="")]
    return [r for i, r in enumerate(out) if r and r not in out[:i]]


def release_state(service: Mapping[str, Any] | None, release: str) -> RunState | None:
    """The run state of ``release`` of a service as read now (None: neither it nor the service is there)."""
    if service is None:
        return None
    update = _g(service, "UpdateStatus", "State")
    if _g(service, "Spec", "Labels", RELEASE_LABEL) != release:
        # Swarm rolled back away from it (during Verify Health: its monitor saw a task fail)
        return RunState.FAILED if update in ROLLED_BACK else None
    # a rollback state here is Swarm's rollback *to* this release: it runs (unless that rollback paused)
    return RunState.FAILED if update in PAUSED else RunState.RUNNING


def update_started(service: Mapping[str, Any] | None) -> str | None:
    """When the service's last rolling update (or rollback) started: what tells a new one from an old one."""
    return _g(service, "UpdateStatus", "StartedAt") if service else None


def converged(service: Mapping[str, Any], tasks: list[Mapping[str, Any]], release: str, before: str | None,
              updated: bool) -> tuple[bool, str | None]:
    """(done, failure) of an update to ``release``: done when Swarm's UpdateStatus (if this update started
    one) is completed and every task meant to run is running the service's task template; failure names a
    rollback or pause by Swarm. ``before``: `update_started` read before the update was sent; ``updated``:
    one was sent."""
    status = service.get("UpdateStatus")
    ours = updated and status is not None and update_started(service) != before
    state = _g(status, "State", default="") if ours else ""
    if state in ROLLED_BACK:
        return False, (f"Swarm rolled back the update to release {release} by itself ({state}: "
                       f"{_g(status, 'Message', default='')})")
    if state == "paused":
        return False, f"Swarm paused the update to release {release}: {_g(status, 'Message', default='')}"
    if ours and state != "completed":
        return False, None
    spec = service.get("Spec") or {}
    if _g(spec, "Labels", RELEASE_LABEL) != release:
        return False, f"service runs release {_g(spec, 'Labels', RELEASE_LABEL)}, not {release} (changed meanwhile)"
    digest = _g(spec, "TaskTemplate", "ContainerSpec", "Labels", TASK_LABEL)
    meant = [t for t in tasks if t.get("DesiredState") == "running"]
    wanted = replicas_of(spec)
    if wanted != "global" and len(meant) != int(wanted):
        return False, None
    done = all(_g(t, "Status", "State") == "running" and _g(t, "Spec", "ContainerSpec", "Labels", TASK_LABEL)
               == digest for t in meant)
    return done and (bool(meant) or wanted == "0"), None


def task_summary(tasks: list[Mapping[str, Any]]) -> str:
    """e.g. '1/2 tasks running (pending: no suitable node ...)' for a timeout's message."""
    meant = [t for t in tasks if t.get("DesiredState") == "running"]
    running = sum(1 for t in meant if _g(t, "Status", "State") == "running")
    others = [f"{_g(t, 'Status', 'State')}: {_g(t, 'Status', 'Err', default='') or _g(t, 'Status', 'Message')}"
              for t in meant if _g(t, "Status", "State") != "running"]
    return f"{running}/{len(meant)} tasks running" + (f" ({'; '.join(others[:3])})" if others else "")
