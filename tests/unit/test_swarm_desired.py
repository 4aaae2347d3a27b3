"""hosts.yaml `clusters` and `method: swarm` manifests: every rule names the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from deployerd.desired import DesiredState, expected_registry_entry, load_desired
from deployerd.tree import DirTree

HOSTS = {"hosts": {"host-a": {"address": "10.0.0.1"}, "host-b": {"address": "10.0.0.2"}},
         "clusters": {"prod": {"manager": "host-a", "registry": "host-a:5000"}}}
SW = {"name": "sw", "method": "swarm", "cluster": "prod", "replicas": 3, "port": 8080, "source": "services/sw"}


def load(tmp_path: Path, hosts: Any = HOSTS, sw: Any = SW) -> DesiredState:
    files = {"hosts.yaml": hosts, "services/sw.yaml": sw, "services/sw/Dockerfile": "FROM busybox:latest\n"}
    for rel, content in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(yaml.safe_dump(content))
    return load_desired(DirTree(tmp_path), "rev")


def test_swarm_service_runs_on_its_clusters_manager(tmp_path: Path) -> None:
    state = load(tmp_path)
    assert not state.errors, state.errors
    spec = state.services["sw"]
    assert (spec.host, spec.cluster, spec.swarm_replicas) == ("host-a", "prod", 3)
    assert spec.rollout.order == "start-first" and spec.rollout.failure_action == "rollback"
    manager = state.hosts["host-a"]
    assert manager.manages is not None and manager.manages.registry == "host-a:5000"
    assert state.hosts["host-b"].manages is None
    assert "swarm" in state.releases["sw"].inputs
    entry = expected_registry_entry(spec, manager, state.releases["sw"])
    assert entry["endpoint"] == "http://10.0.0.1:8080"
    assert (entry["metadata"]["cluster"], entry["metadata"]["replicas"]) == ("prod", 3)


def test_public_url_is_the_endpoint_and_global_mode(tmp_path: Path) -> None:
    state = load(tmp_path, sw={**{k: v for k, v in SW.items() if k != "replicas"}, "mode": "global",
                               "public_url": "https://sw.example.com"})
    assert not state.errors, state.errors
    spec = state.services["sw"]
    entry = expected_registry_entry(spec, state.hosts["host-a"], state.releases["sw"])
    assert entry["endpoint"] == "https://sw.example.com" and entry["metadata"]["replicas"] == "global"


def test_replicas_change_keeps_the_build_inputs(tmp_path: Path) -> None:
    a = load(tmp_path / "a").releases["sw"]
    b = load(tmp_path / "b", sw={**SW, "replicas": 5}).releases["sw"]
    assert a.id != b.id
    assert {k for k in a.inputs if a.inputs[k] != b.inputs[k]} == {"swarm"}


@pytest.mark.parametrize("hosts, sw, file, field, reason", [
    (HOSTS, {**SW, "cluster": "nope"}, "services/sw.yaml", "cluster", "unknown cluster 'nope'"),
    (HOSTS, {k: v for k, v in SW.items() if k != "cluster"}, "services/sw.yaml", "cluster",
     "required for method: swarm"),
    (HOSTS, {**SW, "host": "host-b"}, "services/sw.yaml", "host", "leave host out"),
    (HOSTS, {**SW, "mode": "global"}, "services/sw.yaml", "replicas", "mode: replicated"),
    (HOSTS, {**SW, "replicas": "3"}, "services/sw.yaml", "replicas", "must be an integer"),
    (HOSTS, {**SW, "rollout": {"order": "sideways"}}, "services/sw.yaml", "rollout.order", "start-first"),
    (HOSTS, {**SW, "rollout": {"parallelism": -1}}, "services/sw.yaml", "rollout.parallelism", "greater than or equal"),
    (HOSTS, {**SW, "placement": {"constraints": ["node.role==worker; rm -rf /"]}}, "services/sw.yaml",
     "placement.constraints", "item 0"),
    (HOSTS, {**{k: v for k, v in SW.items() if k != "replicas"}, "mode": "global", "publish_mode": "host"},
     "services/sw.yaml", "rollout.order", "stop-first"),
    (HOSTS, {**SW, "method": "docker", "host": "host-a"}, "services/sw.yaml", "cluster", "only for method: swarm"),
    ({**HOSTS, "clusters": {"prod": {"manager": "host-z", "registry": "host-a:5000"}}}, SW, "hosts.yaml",
     "clusters.prod.manager", "unknown host 'host-z'"),
    ({**HOSTS, "clusters": {"prod": {"manager": "host-a", "registry": "host-a"}}}, SW, "hosts.yaml",
     "clusters.prod.registry", "host:port"),
    ({**HOSTS, "clusters": {"prod": {"manager": "host-a", "registry": "h:5000", "extra": 1}}}, SW, "hosts.yaml",
     "clusters.prod.extra", "unknown field"),
    ({**HOSTS, "clusters": {"prod": {"manager": "host-a", "registry": "a:1"}, "dev": {"manager": "host-a",
                                                                                   "registry": "a:2"}}},
     SW, "hosts.yaml", "clusters.prod.manager", "already manages cluster dev"),  # (YAML dumps keys sorted)
    ({"hosts": {"host-a": {"address": "10.0.0.1", "manages": {}}}}, SW, "hosts.yaml", "hosts.host-a.manages",
     "unknown field"),
])
def test_rule(tmp_path: Path, hosts: Any, sw: Any, file: str, field: str, reason: str) -> None:
    state = load(tmp_path, hosts, sw)
    assert "sw" in state.broken
    matches = [e for e in state.errors if e.file == file and e.field == field]
    assert matches and reason in matches[0].reason, state.errors


def test_broken_hosts_yaml_names_the_cluster(tmp_path: Path) -> None:
    state = load(tmp_path, hosts={"hosts": {}, "clusters": HOSTS["clusters"]})
    assert "sw" in state.broken and not state.complete
    assert any(e.field == "cluster" and "hosts.yaml is invalid" in e.reason for e in state.errors_for("sw"))


def test_host_mode_endpoint_is_a_node_running_a_task(tmp_path: Path) -> None:
    state = load(tmp_path, sw={**SW, "publish_mode": "host"})
    spec, manager, release = state.services["sw"], state.hosts["host-a"], state.releases["sw"]
    assert expected_registry_entry(spec, manager, release, node="10.0.0.7")["endpoint"] == "http://10.0.0.7:8080"
    assert expected_registry_entry(spec, manager, release)["endpoint"] == "http://10.0.0.1:8080"  # none seen yet
    ingress = load(tmp_path / "i")
    assert expected_registry_entry(ingress.services["sw"], manager, release, node="10.0.0.7")["endpoint"] == \
        "http://10.0.0.1:8080"  # the routing mesh answers on every node: the manager's address
