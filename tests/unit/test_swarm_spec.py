"""The Swarm service spec as data, the drift it reveals, and the verdict on an update (no Swarm needed)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from deployerd.observed import RunState
from deployerd.runtimes.base import ReleaseContext
from deployerd.runtimes.swarm import _node_addresses
from deployerd.runtimes.swarm_spec import (
    TASK_LABEL,
    build_tag,
    converged,
    drift,
    image_ref,
    instance_of,
    kept_releases,
    release_state,
    rolled_back,
    running_nodes,
    service_spec,
)
from deployerd.schema import ClusterSpec, HostSpec, Release, ServiceSpec

MANAGER = HostSpec(name="host-a", address="10.0.0.1",
                   manages=ClusterSpec(name="prod", manager="host-a", registry="10.0.0.1:5000"))
SPEC = ServiceSpec(name="web", host="host-a", method="swarm", cluster="prod", replicas=2, port=8080,
                   source="services/web", publish_mode="host", env={"A": "1"})
RELEASE = Release(id="r1", inputs={"source": "s1", "image": "i1", "swarm": "w1"})
CTX = ReleaseContext(spec=SPEC, host=MANAGER, release=RELEASE, commit="c1", env={"A": "1", "SECRET": "x"})
IMAGE = image_ref("10.0.0.1:5000", "web", RELEASE)
SENT = service_spec(CTX, IMAGE)
DIGEST = SENT["TaskTemplate"]["ContainerSpec"]["Labels"][TASK_LABEL]


def observed(spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A service as Swarm returns it: zero values dropped, as its JSON does."""
    read_back = copy.deepcopy(spec)
    read_back["UpdateConfig"] = {k: v for k, v in read_back["UpdateConfig"].items() if v not in (0, 0.0)}
    return {"ID": "svc1", "Spec": read_back, **extra}


def test_spec_is_what_the_manifest_says() -> None:
    assert SENT["Name"] == "web" and SENT["Mode"] == {"Replicated": {"Replicas": 2}}
    cs = SENT["TaskTemplate"]["ContainerSpec"]
    assert cs["Image"] == IMAGE and cs["Env"] == ["A=1", "SECRET=x"]
    assert "deployerd.service" not in cs["Labels"]  # task containers must not look like Docker instances
    assert SENT["UpdateConfig"]["Order"] == "start-first" and SENT["UpdateConfig"]["FailureAction"] == "rollback"
    assert SENT["UpdateConfig"]["Monitor"] == 5_000_000_000
    assert (SENT["RollbackConfig"]["FailureAction"], SENT["RollbackConfig"]["Order"]) == ("pause", "stop-first")
    ingress = service_spec(ReleaseContext(spec=SPEC.model_copy(update={"publish_mode": "ingress"}), host=MANAGER,
                                          release=RELEASE, commit="c1"), IMAGE)
    assert ingress["RollbackConfig"]["Order"] == "start-first"  # as the rollout says
    assert SENT["EndpointSpec"]["Ports"] == [{"Protocol": "tcp", "TargetPort": 8080, "PublishedPort": 8080,
                                              "PublishMode": "host"}]
    labels = SENT["Labels"]
    assert (labels["deployerd.release"], labels["deployerd.commit"], labels["deployerd.replicas"]) == ("r1", "c1", "2")


def test_a_change_of_replicas_or_rollout_keeps_the_image_and_the_task_template() -> None:
    """Scaling restarts no task: the template (and its digest) stays; a change of env does not."""
    other = Release(id="r2", inputs={**RELEASE.inputs, "swarm": "w2"})
    assert build_tag(other) == build_tag(RELEASE)
    assert build_tag(Release(id="r3", inputs={**RELEASE.inputs, "source": "s2"})) != build_tag(RELEASE)
    scaled = ReleaseContext(spec=SPEC.model_copy(update={"replicas": 3}), host=MANAGER, release=other, commit="c2",
                            env=CTX.env)
    assert service_spec(scaled, IMAGE)["TaskTemplate"] == SENT["TaskTemplate"]
    env = ReleaseContext(spec=SPEC, host=MANAGER, release=other, commit="c2", env={**CTX.env, "B": "2"})
    assert service_spec(env, IMAGE)["TaskTemplate"]["ContainerSpec"]["Labels"][TASK_LABEL] != DIGEST


def task(state: str, digest: str = DIGEST, desired: str = "running", node: str = "n1",
         service: str = "svc1") -> dict[str, Any]:
    return {"ServiceID": service, "NodeID": node, "DesiredState": desired, "Status": {"State": state},
            "Spec": {"ContainerSpec": {"Labels": {TASK_LABEL: digest}}}}


def test_a_service_as_read_back_has_no_drift() -> None:
    svc = observed(SENT)
    assert drift(svc) is None
    nodes = {"n1": "10.0.0.2", "n2": "10.0.0.1", "n3": "10.0.0.3"}
    tasks = [task("running", node="n1"), task("running", node="n2"), task("running", digest="old", node="n3"),
             task("running", node="n3", service="other")]
    where = running_nodes(svc, tasks, nodes)
    assert where == ["10.0.0.1", "10.0.0.2"]  # sorted; an old template's task and another service's are not it
    inst = instance_of(svc, where, host="host-a")
    assert (inst.service, inst.release, inst.method, inst.state, inst.drift, inst.nodes) == (
        "web", "r1", "swarm", RunState.RUNNING, None, where)


def test_drift_names_what_was_done_by_hand() -> None:
    svc = observed(SENT)
    scaled = copy.deepcopy(svc)
    scaled["Spec"]["Mode"]["Replicated"]["Replicas"] = 1
    assert drift(scaled) == "scaled by hand to 1 replicas (deployerd set 2)"
    updated = copy.deepcopy(svc)
    updated["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"].append("HAND=1")
    assert drift(updated) == "updated by hand (its spec differs from the one deployerd set)"
    paused = {**svc, "UpdateStatus": {"State": "paused", "Message": "update paused due to failure"}}
    assert "paused" in (drift(paused) or "")
    assert instance_of(paused, ["10.0.0.1"], host="host-a").state is RunState.FAILED
    assert instance_of(svc, [], host="host-a").state is RunState.FAILED  # no task runs


def test_swarm_rollback_is_a_note_not_drift() -> None:
    svc = observed(SENT, UpdateStatus={"State": "rollback_completed", "Message": "rollback completed"},
                   PreviousSpec={"Labels": {"deployerd.release": "r2"}})
    assert drift(svc) is None
    assert rolled_back(svc) == "Swarm rolled back release r2 by itself (rollback_completed: rollback completed)"
    assert instance_of(svc, ["10.0.0.1"], host="host-a").note == rolled_back(svc)
    assert kept_releases(svc) == ["r1", "r2"]


@pytest.mark.parametrize("status, tasks, updated, want", [
    (None, [task("running"), task("running")], True, (True, None)),  # created: no rolling update
    (None, [task("running"), task("starting")], True, (False, None)),
    (None, [task("running"), task("running", digest="old")], True, (False, None)),  # the old template
    (None, [task("running")], True, (False, None)),  # 1 of 2 replicas
    ({"State": "updating", "StartedAt": "t2"}, [task("running"), task("running")], True, (False, None)),
    ({"State": "completed", "StartedAt": "t2"}, [task("running"), task("running")], True, (True, None)),
    ({"State": "completed", "StartedAt": "t1"}, [task("running"), task("running")], True, (True, None)),  # no update
    ({"State": "completed", "StartedAt": "t1"}, [task("running"), task("running", digest="old")], True,
     (False, None)),  # sent, not started yet: the old template still runs
    ({"State": "rollback_started", "StartedAt": "t2"}, [task("running")], True, (False, "rolled back")),
    ({"State": "rollback_paused", "StartedAt": "t2"}, [task("running")], True, (False, "rolled back")),
    ({"State": "rollback_completed", "StartedAt": "t2"}, [task("running")] * 2, True, (False, "rolled back")),
    ({"State": "rollback_completed", "StartedAt": "t1"}, [task("running")] * 2, True, (True, None)),  # an old one
    ({"State": "rollback_completed", "StartedAt": "t2"}, [task("running")] * 2, False, (True, None)),  # not sent
    ({"State": "paused", "StartedAt": "t2"}, [task("running")] * 2, True, (False, "paused")),
    (None, [task("running"), task("running"), task("shutdown", desired="shutdown")], True, (True, None)),
])
def test_verdict(status: Any, tasks: list[dict[str, Any]], updated: bool, want: tuple[bool, str | None]) -> None:
    svc = observed(SENT, **({"UpdateStatus": status} if status else {}))
    done, failure = converged(svc, tasks, "r1", before="t1", updated=updated)
    assert done is want[0]
    if want[1] is None:
        assert failure is None
    else:
        assert failure is not None and want[1] in failure


def test_verdict_on_a_service_changed_meanwhile() -> None:
    svc = observed({**SENT, "Labels": {**SENT["Labels"], "deployerd.release": "r9"}})
    done, failure = converged(svc, [task("running")] * 2, "r1", before=None, updated=True)
    assert not done and failure is not None and "r9" in failure


def test_node_addresses_of_a_manager_listening_on_every_address() -> None:
    nodes = [{"ID": "m", "Status": {"Addr": "0.0.0.0"}, "ManagerStatus": {"Addr": "10.0.0.1:2377"}},
             {"ID": "w", "Status": {"Addr": "10.0.0.2"}}, {"ID": "gone", "Status": {}}]
    assert _node_addresses(nodes) == {"m": "10.0.0.1", "w": "10.0.0.2"}


@pytest.mark.parametrize("spec_release, update, want", [
    ("r1", None, RunState.RUNNING),
    ("r1", "completed", RunState.RUNNING),
    ("r1", "paused", RunState.FAILED),
    ("r1", "rollback_started", RunState.RUNNING),  # Swarm rolls back *to* r1: deployerd's rollback target runs
    ("r1", "rollback_completed", RunState.RUNNING),
    ("r1", "rollback_paused", RunState.FAILED),
    ("r0", "rollback_started", RunState.FAILED),  # Swarm rolled back *from* r1 during Verify Health
    ("r0", "completed", None),  # another release runs: r1 is gone
])
def test_release_state(spec_release: str, update: str | None, want: RunState | None) -> None:
    svc = observed({**SENT, "Labels": {**SENT["Labels"], "deployerd.release": spec_release}},
                   **({"UpdateStatus": {"State": update}} if update else {}))
    assert release_state(svc, "r1") is want
    assert release_state(None, "r1") is None
