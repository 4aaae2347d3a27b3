"""Docker Swarm clusters in hosts.yaml, and the ``method: swarm`` manifests placed on them.

``clusters: {prod: {manager: host-a, registry: "host-a:5000"}}``: the manager is a host of ``hosts``, reached
over SSH like the others; its HostSpec carries its cluster (``manages``), so the swarm runtime on it knows it
drives a Swarm and which image registry the nodes pull from. A swarm manifest names its cluster and no host:
it runs where Swarm puts it, driven through the manager, so its ``host`` is filled in as the manager here.
Swarm-only fields on another method are refused rather than ignored. Every error names the file and field.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from deployerd.schema import HOSTS_FILE, ClusterSpec, HostSpec, ManifestError, ServiceSpec
from deployerd.validation import Invalid, key_name, translate

SWARM_ONLY = ("cluster", "mode", "replicas", "placement", "publish_mode")  # rollout: placement.py


def host_field_errors(file: str, field: str, body: dict[str, Any]) -> list[ManifestError]:
    """A host entry may not say what it manages: its cluster names it (under ``clusters``)."""
    if "manages" in body:
        return [ManifestError(file=file, field=f"{field}.manages",
                              reason="unknown field (a cluster names its manager under clusters)")]
    return []


def load_clusters(raw: Any, hosts: dict[str, HostSpec]) -> list[ManifestError]:
    """Validate hosts.yaml ``clusters`` and put each on its manager's HostSpec (in ``hosts``); the errors."""
    file = HOSTS_FILE
    if not isinstance(raw, dict):
        return [ManifestError(file=file, field="clusters", reason="must be a mapping of cluster name to settings")]
    errors: list[ManifestError] = []
    for name, body in raw.items():
        field = f"clusters.{key_name(name)[:64]}"
        if not isinstance(name, str) or not isinstance(body, dict):
            errors.append(ManifestError(file=file, field=field, reason="must be a mapping (cluster name: settings)"))
            continue
        try:
            cluster = ClusterSpec.model_validate({**body, "name": name})
        except ValidationError as exc:
            errors.extend(translate(file, exc, ("clusters", name)))
            continue
        manager = hosts.get(cluster.manager)
        if manager is None:
            errors.append(ManifestError(file=file, field=f"{field}.manager",
                                        reason=f"unknown host {cluster.manager!r} (not in hosts)"))
        elif manager.manages is not None:
            errors.append(ManifestError(file=file, field=f"{field}.manager", reason=(
                f"host {cluster.manager} already manages cluster {manager.manages.name}")))
        else:
            hosts[cluster.manager] = manager.model_copy(update={"manages": cluster})
    return errors


def clusters_of(hosts: dict[str, HostSpec]) -> dict[str, ClusterSpec]:
    """The clusters of hosts.yaml, by name."""
    return {h.manages.name: h.manages for h in hosts.values() if h.manages is not None}


def place_on_cluster(file: str, doc: dict[str, Any], clusters: dict[str, ClusterSpec] | None) -> None:
    """Fill in a swarm manifest's ``host`` (its cluster's manager) before it is validated; raise Invalid for a
    missing or unknown cluster, a host given, or Swarm fields on another method. ``clusters`` None: hosts.yaml
    is broken, and the service with it."""
    if doc.get("method") != "swarm":
        wrong = [ManifestError(file=file, field=k, reason="only for method: swarm") for k in SWARM_ONLY if k in doc]
        if wrong:
            raise Invalid(wrong)
        return
    name = doc.get("cluster")
    if name is None:
        raise Invalid([ManifestError(file=file, field="cluster", reason="required for method: swarm")])
    shown = key_name(name)[:64]
    if clusters is None:
        raise Invalid([ManifestError(file=file, field="cluster",
                                     reason=f"{HOSTS_FILE} is invalid, so cluster {shown!r} is unknown")])
    cluster = clusters.get(name) if isinstance(name, str) else None
    if cluster is None:
        raise Invalid([ManifestError(file=file, field="cluster",
                                     reason=f"unknown cluster {shown!r} (not in {HOSTS_FILE} clusters)")])
    if "host" in doc and doc["host"] != cluster.manager:
        raise Invalid([ManifestError(file=file, field="host", reason=(
            f"a swarm service runs on its cluster; leave host out (cluster {name} is managed by {cluster.manager})"))])
    doc["host"] = cluster.manager


def service_errors(file: str, spec: ServiceSpec) -> list[ManifestError]:
    """Rules across fields of a swarm manifest."""
    if spec.method == "swarm" and spec.mode == "global" and spec.publish_mode == "host" \
            and spec.rollout.order == "start-first":
        return [ManifestError(file=file, field="rollout.order", reason=(
            "mode: global with publish_mode: host needs stop-first (the old task holds its node's port, "
            "so a new one could never start beside it)"))]
    return []
