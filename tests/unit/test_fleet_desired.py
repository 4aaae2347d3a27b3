"""Fleets in the desired state: ``hosts:`` lists and tags, one release id on every host, per-host inputs, ports on
every placed host, the rollout fields, the fleet's Registry entry, and release ids of everything else unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_desired import API, WEB, build, load

from deployerd.desired import DesiredState, HostSpec, Release, ServiceSpec, expected_registry_entry, load_desired
from deployerd.secrets import Secrets

HOSTS = {"hosts": {"web-1": {"address": "10.0.0.1", "tags": ["web", "eu"]},
                   "web-2": {"address": "10.0.0.2", "tags": ["web"], "base_dir": "/srv/deployerd/services"},
                   "web-3": {"address": "10.0.0.3", "tags": ["web"], "ingress": "haproxy"},
                   "db-1": {"address": "10.0.0.4", "tags": ["db"]}, "prod-1": {"address": "10.0.0.5"}}}
FLEET = {**{k: v for k, v in WEB.items() if k != "host"}, "hosts": ["web-2", "web-1", "web-3"]}


def fleet(tmp_path: Path, web: Any = FLEET, **files: Any) -> DesiredState:
    return load(tmp_path, {"hosts.yaml": HOSTS, "services/web.yaml": web, **files})


def test_release_ids_of_one_host_and_swarm_services_are_unchanged(tmp_path: Path) -> None:
    """Ids computed on the code before fleets existed: a deployed service must not be redeployed by the upgrade."""
    hosts = {"hosts": {"prod-1": {"address": "10.0.0.1"}, "prod-2": {"address": "10.0.0.2", "ingress": "haproxy"},
                       "mgr": {"address": "10.0.0.3"}},
             "clusters": {"prod": {"manager": "mgr", "registry": "mgr:5000"}}}
    state = load(tmp_path, {
        "hosts.yaml": hosts,
        "services/sys.yaml": {"name": "sys", "host": "prod-2", "port": 8090, "method": "systemd",
                              "source": "services/api"},
        "services/sw.yaml": {"name": "sw", "cluster": "prod", "method": "swarm", "port": 8091, "source": "services/api",
                             "replicas": 2, "rollout": {"parallelism": 2, "delay_s": 1.5}},
        "services/sw2.yaml": {"name": "sw2", "cluster": "prod", "method": "swarm", "port": 8092,
                              "source": "services/api"}})
    assert not state.errors, state.errors
    assert {n: r.id for n, r in state.releases.items()} == {
        "api": "28cb17a50a91", "sw": "39dac573be9c", "sw2": "6def8f36893e", "sys": "4bc728c09f25",
        "web": "c69329883006"}
    assert all(state.host_releases[n] == {s.host: state.releases[n]} for n, s in state.services.items())
    assert all(not s.fleet and s.placed_on == [s.host] for s in state.services.values())


def test_hosts_list_is_the_fleet_in_manifest_order(tmp_path: Path) -> None:
    state = fleet(tmp_path)
    assert not state.errors, state.errors
    web = state.services["web"]
    assert web.fleet == web.placed_on == ["web-2", "web-1", "web-3"] and web.host == "web-2"
    assert state.services["api"].fleet == [] and state.services["api"].placed_on == ["prod-1"]


def test_tag_is_every_tagged_host_in_hosts_yaml_order(tmp_path: Path) -> None:
    state = fleet(tmp_path, {**FLEET, "hosts": {"tag": "web"}})
    assert not state.errors, state.errors
    assert state.services["web"].fleet == ["web-1", "web-2", "web-3"] and state.services["web"].host == "web-1"
    assert state.hosts["web-1"].tags == ["web", "eu"] and state.hosts["db-1"].tags == ["db"]


def test_one_release_id_on_every_host_with_host_inputs_of_its_own(tmp_path: Path) -> None:
    state = fleet(tmp_path)
    on = state.host_releases["web"]
    assert set(on) == {"web-1", "web-2", "web-3"}
    assert len({r.id for r in on.values()}) == 1 and state.releases["web"] == on["web-2"]
    assert on["web-1"].inputs["host"] != on["web-2"].inputs["host"]  # name and base_dir
    assert "ingress" in on["web-3"].inputs and "ingress" not in on["web-1"].inputs
    shared = {k: v for k, v in on["web-1"].inputs.items() if k not in ("host", "ingress")}
    assert all({k: v for k, v in r.inputs.items() if k not in ("host", "ingress")} == shared for r in on.values())
    assert state.release_on("web", "web-3") == on["web-3"] and state.release_on("api", "prod-1").id


def test_fleet_id_follows_shared_inputs_not_placement(tmp_path: Path) -> None:
    base = fleet(tmp_path / "a").releases["web"].id
    assert fleet(tmp_path / "b", {**FLEET, "hosts": ["web-1", "web-3"]}).releases["web"].id == base
    assert fleet(tmp_path / "c", {**FLEET, "env": {"GREETING": "hello"}}).releases["web"].id != base
    assert fleet(tmp_path / "d", {**FLEET, "rollout": {"canary": 0, "batch": "50%"}}).releases["web"].id == base
    changed_host = {"hosts": {**HOSTS["hosts"], "web-1": {"address": "10.0.0.1", "base_dir": "/srv/other"}}}
    moved = fleet(tmp_path / "e", **{"hosts.yaml": changed_host})
    assert moved.releases["web"].id == base
    assert moved.host_releases["web"]["web-1"].inputs["host"] != fleet(tmp_path / "f").host_releases["web"][
        "web-1"].inputs["host"]


async def test_secrets_join_every_hosts_release_keeping_one_id(tmp_path: Path) -> None:
    (tmp_path / "secrets.yaml").write_text("services:\n  web:\n    TOKEN: t-1\n")
    (tmp_path / "secrets.yaml").chmod(0o600)
    tree = build(tmp_path / "repo", {"hosts.yaml": HOSTS, "services/web.yaml": {**FLEET, "secrets": ["TOKEN"]}})
    state = load_desired(tree, "rev")
    out, _ = await Secrets(tmp_path / "secrets.yaml", None, tmp_path / "state").apply(state, tree)
    on = out.host_releases["web"]
    assert all("secrets" in r.inputs for r in on.values()) and len({r.id for r in on.values()}) == 1
    assert out.releases["web"] == on["web-2"] and out.releases["web"].id != state.releases["web"].id


FLEET_CASES = [
    ("unknown-host", {**FLEET, "hosts": ["web-1", "nope"]}, "hosts[1]", "unknown host 'nope' (not in hosts.yaml)"),
    ("twice", {**FLEET, "hosts": ["web-1", "web-2", "web-1"]}, "hosts[2]", "host 'web-1' is listed twice"),
    ("not-a-name", {**FLEET, "hosts": ["web-1", 3]}, "hosts[1]", "must be a host name"),
    ("empty", {**FLEET, "hosts": []}, "hosts", "at least one host"),
    ("scalar", {**FLEET, "hosts": "web-1"}, "hosts", "list of host names or {tag: <tag>}"),
    ("no-tagged-host", {**FLEET, "hosts": {"tag": "api"}}, "hosts.tag", "no host has tag 'api'"),
    ("tag-missing", {**FLEET, "hosts": {}}, "hosts.tag", "required field missing"),
    ("tag-extra", {**FLEET, "hosts": {"tag": "web", "also": "db"}}, "hosts.also", "unknown field"),
    ("both", {**FLEET, "host": "web-1"}, "host", "not both"),
    ("fleet-field", {**FLEET, "fleet": ["web-1"]}, "fleet", "unknown field"),
    ("swarm-field-on-fleet", {**FLEET, "rollout": {"parallelism": 2}}, "rollout.parallelism",
     "only for method: swarm"),
    ("waves-on-one-host", {**WEB, "rollout": {"canary": 1}}, "rollout.canary", "only for a service on several hosts"),
    ("batch-zero", {**FLEET, "rollout": {"batch": 0}}, "rollout.batch", "greater than or equal to 1"),
    ("batch-pct", {**FLEET, "rollout": {"batch": "0%"}}, "rollout.batch", "percentage"),
    ("batch-text", {**FLEET, "rollout": {"batch": "half"}}, "rollout.batch", "percentage"),
    ("canary-neg", {**FLEET, "rollout": {"canary": -1}}, "rollout.canary", "greater than or equal to 0"),
    ("pause-neg", {**FLEET, "rollout": {"pause_s": -1}}, "rollout.pause_s", "greater than or equal to 0"),
    ("max-failed", {**FLEET, "rollout": {"max_failed_hosts": "1"}}, "rollout.max_failed_hosts", "integer"),
]


@pytest.mark.parametrize(("web", "field", "reason"), [c[1:] for c in FLEET_CASES], ids=[c[0] for c in FLEET_CASES])
def test_fleet_rule(tmp_path: Path, web: Any, field: str, reason: str) -> None:
    state = fleet(tmp_path, web)
    matches = [e for e in state.errors if e.file == "services/web.yaml" and e.field == field]
    assert matches and reason in matches[0].reason, state.errors
    assert state.broken == {"web"} and "api" in state.services


def test_fleet_fields_refused_on_swarm_and_hosts_on_swarm(tmp_path: Path) -> None:
    hosts = {"hosts": HOSTS["hosts"],
             "clusters": {"prod": {"manager": "web-1", "registry": "web-1:5000"}}}
    sw = {"name": "sw", "method": "swarm", "cluster": "prod", "port": 8095, "source": "services/api"}
    for body, field in (({**sw, "rollout": {"batch": 2}}, "rollout.batch"), ({**sw, "hosts": ["web-1"]}, "hosts")):
        state = load(tmp_path / field, {"hosts.yaml": hosts, "services/sw.yaml": body})
        assert [e.field for e in state.errors] == [field], state.errors


def test_tags_are_dns_labels(tmp_path: Path) -> None:
    state = load(tmp_path, {"hosts.yaml": {"hosts": {"prod-1": {"address": "10.0.0.1", "tags": ["Web!"]}}}})
    assert any(e.file == "hosts.yaml" and e.field == "hosts.prod-1.tags.0" for e in state.errors), state.errors


def test_ports_are_checked_on_every_placed_host(tmp_path: Path) -> None:
    clash = load(tmp_path, {"hosts.yaml": HOSTS, "services/web.yaml": {**FLEET, "port": 8081},
                            "services/api.yaml": {**API, "host": "web-3"}})
    assert {e.field for e in clash.errors} == {"port"} and clash.broken == {"web", "api"}
    assert all("port 8081 on host web-3" in e.reason for e in clash.errors), clash.errors
    fine = load(tmp_path / "b", {"hosts.yaml": HOSTS, "services/web.yaml": {**FLEET, "port": 8081},
                                 "services/api.yaml": {**API, "host": "db-1"}})
    assert not fine.errors, fine.errors


def test_fleet_registry_entry_lists_every_serving_host() -> None:
    hosts = {n: HostSpec.model_validate({**b, "name": n}) for n, b in HOSTS["hosts"].items()}
    spec = ServiceSpec.model_validate({**FLEET, "host": "web-2", "fleet": ["web-2", "web-1", "web-3"]})
    new, old = Release(id="rel000000002", inputs={}), "rel000000001"
    serving = {"web-3": (hosts["web-3"], old), "web-2": (hosts["web-2"], new.id)}  # web-1: not deployed yet
    entry = expected_registry_entry(spec, hosts["web-3"], new, "prod", fleet=serving)
    assert entry["endpoint"] == "http://10.0.0.2:8080"  # the first serving host in fleet order
    assert entry["metadata"] == {
        "managed_by": "deployerd", "instance": "prod", "release": new.id, "host": "web-2", "method": "docker",
        "hosts": [{"host": "web-2", "endpoint": "http://10.0.0.2:8080", "release": new.id},
                  {"host": "web-3", "endpoint": "http://10.0.0.3:8080", "release": old}]}
    public = expected_registry_entry(spec.model_copy(update={"public_url": "https://web.example.com"}),
                                     hosts["web-3"], new, fleet=serving)
    assert public["endpoint"] == "https://web.example.com"
    one = expected_registry_entry(spec.model_copy(update={"fleet": []}), hosts["web-2"], new, fleet=serving)
    assert one == expected_registry_entry(spec.model_copy(update={"fleet": []}), hosts["web-2"], new)
    assert "hosts" not in one["metadata"]  # a one-host service keeps its shape
