"""Release ids: a hash of exactly what defines a deployment, and what a deployment advertises.

A release id hashes the source files, build/run settings, env, port, health check and host, so a commit
that touches nothing of a service keeps its id, and each input's own digest lets the planner name *which*
input changed. A service on several hosts (a fleet) has one release id on all of them: its per-host inputs
have their own digests outside the id.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Mapping
from typing import Any

from deployerd.schema import (
    DEFAULT_COMMAND,
    DEFAULT_COMMAND_BEFORE,
    SWARM_ROLLOUT,
    HostSpec,
    Release,
    ServiceSpec,
    release_id,
)
from deployerd.tree import Entry


def _digest(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def compute_release(spec: ServiceSpec, host: HostSpec, source: list[Entry]) -> Release:
    """Per-input digests (source, image, env, port, health, host) and the id over all of them.

    Env values only enter as a digest; the commit does not enter at all, so an unrelated commit keeps
    the id. Secret values are not known here: the daemon adds their keyed digest (`Release.with_input`).
    Only the settings of the chosen method count (editing the systemd block of a docker service changes
    nothing that runs). A fleet's release (`fleet_releases`) leaves its per-host inputs out of the id.
    """
    return fleet_releases(spec, [host], source)[host.name]


PER_HOST = ("host", "ingress")  # the inputs a fleet's release id leaves out: its own on each host


def fleet_releases(spec: ServiceSpec, hosts: list[HostSpec], source: list[Entry]) -> dict[str, Release]:
    """The release on each of ``hosts`` (a one-host service: its host). For a fleet (``spec.fleet``) the id is
    the same on every host: the host's own settings (``host``, ``ingress``) have a digest each but no part in
    it. The shared inputs are digested once, whatever the number of hosts."""
    shared = _shared_inputs(spec, source)
    out: dict[str, Release] = {}
    for host in hosts:
        inputs = {**shared, "host": _digest({"name": host.name, "base_dir": host.base_dir})}
        if host.ingress != "none":  # behind a proxy an instance listens elsewhere: a new release (none: ids unchanged)
            inputs["ingress"] = _digest(host.ingress)
        if spec.method == "swarm":  # how the cluster runs it: a change updates the service, with no rebuild
            inputs["swarm"] = _digest({"cluster": host.manages.model_dump() if host.manages else None,
                                       "mode": spec.mode, "replicas": spec.swarm_replicas,
                                       "placement": spec.placement.model_dump(),
                                       "rollout": spec.rollout.model_dump(include=set(SWARM_ROLLOUT)),
                                       "publish_mode": spec.publish_mode})
        per_host = PER_HOST if spec.fleet else ()
        out[host.name] = Release(id=release_id(inputs, per_host), inputs=inputs, per_host=per_host)
    return out


def _shared_inputs(spec: ServiceSpec, source: list[Entry]) -> dict[str, str]:
    prefix = len(spec.source) + 1
    image: dict[str, Any] = {"method": spec.method}
    if spec.builds_image:
        image["docker"] = spec.docker.model_dump(exclude={"container_port"})  # ports count under "port"
    else:
        image["systemd"] = spec.systemd.model_dump()
        if spec.systemd.command == DEFAULT_COMMAND:  # same release ids as before {host} was the default's
            image["systemd"]["command"] = DEFAULT_COMMAND_BEFORE
    return {
        "source": _digest([[e.path[prefix:], e.mode, e.sha] for e in source]),
        "image": _digest(image),
        "env": _digest(spec.env),
        "port": _digest([spec.port, spec.container_port if spec.builds_image else None]),
        "health": _digest(spec.health.model_dump()),
    }


def expected_registry_entry(
    spec: ServiceSpec, host: HostSpec, release: Release, instance: str = "default", managed_by: str = "git",
    node: str | None = None, fleet: Mapping[str, tuple[HostSpec, str]] | None = None,
) -> dict[str, Any]:
    """The Registry record a healthy deployment should have; used by plan (compare) and Register (write).

    ``instance`` names the daemon that owns the entry, so daemons sharing a Registry never prune each other's;
    an out-of-band service's (``managed_by`` ``api``) says ``deployerd-api``, so a commit never prunes it.
    The endpoint is the manifest's ``public_url``, else where the service answers: its host, or for a Swarm
    service published in host mode ``node``, the address of a node that runs one of its tasks.
    A fleet has one entry too: ``fleet`` maps each host serving it to (its HostSpec, the release it serves);
    ``metadata.hosts`` lists them in the fleet's order, the endpoint is the first one's (when no public_url),
    ``metadata.host`` the fleet's first host and ``metadata.release`` the release being registered.
    """
    metadata: dict[str, Any] = {"managed_by": "deployerd" if managed_by == "git" else f"deployerd-{managed_by}",
                                "instance": instance, "release": release.id, "host": host.name, "method": spec.method}
    if spec.method == "swarm":
        metadata.update(cluster=spec.cluster, replicas="global" if spec.swarm_replicas is None else spec.swarm_replicas)
    where = host if node is None or spec.publish_mode != "host" else host.model_copy(update={"public_address": node})
    if spec.fleet and fleet is not None:
        serving = [(name, *fleet[name]) for name in spec.fleet if name in fleet]
        metadata.update(host=spec.fleet[0], hosts=[{"host": name, "endpoint": endpoint_url(h, spec.port),
                                                    "release": rel} for name, h, rel in serving])
        where = serving[0][1] if serving else host
    return {"endpoint": spec.public_url or endpoint_url(where, spec.port), "status": "active", "metadata": metadata}


def endpoint_url(host: HostSpec, port: int) -> str:
    """Where a service on ``host`` answers, as the Registry and the API advertise it (IPv6 in brackets)."""
    return f"http://{_url_host(host.public_address or host.address)}:{port}"


def _url_host(address: str) -> str:
    try:
        return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:
        return address
