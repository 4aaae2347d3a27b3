"""The Swarm service spec as data, the drift it reveals, and the verdict on an update (no Swarm needed)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from deployerd.desired import ClusterSpec, HostSpec, Release, ServiceSpec
from deployerd.observed import RunState
from deployerd.runtimes.base import ReleaseContext
from deployerd.runtimes.swarm_spec import (
    build_tag,
    converged,
    drift,
    image_ref,
    instance_of,
    kept_releases,
    rolled_back,
    service_spec,
)

MANAGER = HostSpec(name="host-a", address="10.0.0.1",
                   manages=ClusterSpec(name="prod", manager="host-a", registry="10.0.0.1:5000"))
SPEC = ServiceSpec(name="web", host="host-a", method="swarm", cluster="prod", replicas=2, port=8080,
                   source="services/web", publish_mode="host", env={"A": "1"})
RELEASE = Release(id="r1", inputs={"source": "s1", "image": "i1", "swarm": "w1"})
CTX = ReleaseContext(spec=SPEC, host=MANAGER, release=RELEASE, commit="c1", env={"A": "1", "SECRET": "x"})
IMAGE = image_ref("10.0.0.1:5000", "web", RELEASE)


def observed(spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A service as Swarm returns it: zero values dropped, as its JSON does."""
    read_back = copy.deepcopy(spec)
    read_back["UpdateConfig"] = {k: v for k, v in read_back["UpdateConfig"].items() if v not in (0, 0.0)}
    return {"ID": "svc1", "Spec": read_back, **extra}


def test_spec_is_what_the_manifest_says() -> None:
    spec = service_spec(CTX, IMAGE)
    assert spec["Name"] == "web" and spec["Mode"] == {"Replicated": {"Replicas": 2}}
    cs = spec["TaskTemplate"]["ContainerSpec"]
    assert cs["Image"] == IMAGE and cs["Env"] == ["A=1", "SECRET=x"]
    assert "deployerd.service" not in cs["Labels"]  # task containers must not look like Docker instances
    assert spec["UpdateConfig"]["Order"] == "start-first" and spec["UpdateConfig"]["FailureAction"] == "rollback"
    assert spec["UpdateConfig"]["Monitor"] == 5_000_000_000
    assert spec["EndpointSpec"]["Ports"] == [{"Protocol": "tcp", "TargetPort": 8080, "PublishedPort": 8080,
                                              "PublishMode": "host"}]
    labels = spec["Labels"]
    assert (labels["deployerd.release"], labels["deployerd.commit"], labels["deployerd.replicas"]) == ("r1", "c1", "2")


def test_image_tag_follows_build_inputs_only() -> None:
    other = Release(id="r2", inputs={**RELEASE.inputs, "swarm": "w2", "env": "e2"})
    assert build_tag(other) == build_tag(RELEASE)
    assert build_tag(Release(id="r3", inputs={**RELEASE.inputs, "source": "s2"})) != build_tag(RELEASE)


def test_a_service_as_read_back_has_no_drift() -> None:
    svc = observed(service_spec(CTX, IMAGE))
    assert drift(svc) is None
    inst = instance_of(svc, running=2, host="host-a")
    assert (inst.service, inst.release, inst.method, inst.state, inst.drift) == ("web", "r1", "swarm",
                                                                                RunState.RUNNING, None)


def test_drift_names_what_was_done_by_hand() -> None:
    svc = observed(service_spec(CTX, IMAGE))
    scaled = copy.deepcopy(svc)
    scaled["Spec"]["Mode"]["Replicated"]["Replicas"] = 1
    assert drift(scaled) == "scaled by hand to 1 replicas (deployerd set 2)"
    updated = copy.deepcopy(svc)
    updated["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"].append("HAND=1")
    assert drift(updated) == "updated by hand (its spec differs from the one deployerd set)"
    paused = {**svc, "UpdateStatus": {"State": "paused", "Message": "update paused due to failure"}}
    assert drift(paused) is not None and "paused" in drift(paused)  # type: ignore[operator]
    assert instance_of(paused, running=2, host="host-a").state is RunState.FAILED
    assert instance_of(svc, running=0, host="host-a").state is RunState.FAILED


def test_swarm_rollback_is_a_note_not_drift() -> None:
    prev = service_spec(CTX, IMAGE)
    svc = observed(prev, UpdateStatus={"State": "rollback_completed", "Message": "rollback completed"},
                   PreviousSpec={"Labels": {"deployerd.release": "r2"}})
    assert drift(svc) is None
    assert rolled_back(svc) == "Swarm rolled back release r2 by itself (rollback_completed: rollback completed)"
    assert kept_releases(svc) == ["r1", "r2"]


def task(state: str, image: str = IMAGE, desired: str = "running") -> dict[str, Any]:
    return {"DesiredState": desired, "Status": {"State": state}, "Spec": {"ContainerSpec": {"Image": image}}}


@pytest.mark.parametrize("status, tasks, updated, want", [
    (None, [task("running"), task("running")], True, (True, None)),  # created: no rolling update
    (None, [task("running"), task("starting")], True, (False, None)),
    (None, [task("running"), task("running", image="old")], True, (False, None)),
    (None, [task("running")], True, (False, None)),  # 1 of 2 replicas
    ({"State": "updating", "StartedAt": "t2"}, [task("running"), task("running")], True, (False, None)),
    ({"State": "completed", "StartedAt": "t2"}, [task("running"), task("running")], True, (True, None)),
    ({"State": "completed", "StartedAt": "t1"}, [task("running"), task("running")], True, (True, None)),  # old one
    ({"State": "rollback_started", "StartedAt": "t2"}, [task("running")], True, (False, "rolled back")),
    ({"State": "rollback_completed", "StartedAt": "t2"}, [task("running")] * 2, True, (False, "rolled back")),
    ({"State": "rollback_completed", "StartedAt": "t1"}, [task("running")] * 2, True, (True, None)),
    ({"State": "rollback_completed", "StartedAt": "t2"}, [task("running")] * 2, False, (True, None)),  # not sent
    ({"State": "paused", "StartedAt": "t2"}, [task("running")] * 2, True, (False, "paused")),
    (None, [task("running"), task("running"), task("shutdown", desired="shutdown")], True, (True, None)),
])
def test_verdict(status: Any, tasks: list[dict[str, Any]], updated: bool, want: tuple[bool, str | None]) -> None:
    svc = observed(service_spec(CTX, IMAGE), **({"UpdateStatus": status} if status else {}))
    done, failure = converged(svc, tasks, IMAGE, "r1", before="t1", updated=updated)
    assert done is want[0]
    if want[1] is None:
        assert failure is None
    else:
        assert failure is not None and want[1] in failure
