"""The older Deployer's shape as data: deployerd job records in, exactly what an older caller reads out."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from deployerd.legacy import DeployRequest, Refused, created, job_status, legacy_job, service_spec
from deployerd.store import PHASES, Job, JobStatus, PhaseRecord, PhaseStatus

T0, T1 = "2025-01-14T10:00:00.250000Z", "2025-01-14T10:01:04.900000Z"


def phases(*statuses: PhaseStatus, **details: dict[str, Any]) -> list[PhaseRecord]:
    out = []
    for name, status in zip(PHASES, statuses, strict=False):
        ended = status in (PhaseStatus.SUCCEEDED, PhaseStatus.FAILED, PhaseStatus.SKIPPED)
        out.append(PhaseRecord(phase=name, status=status, started_at=T0 if status is not PhaseStatus.PENDING else None,
                               completed_at=T1 if ended else None, duration_seconds=2.6 if ended else None,
                               details=details.get(name.split()[0].lower(), {}),
                               error="exit code 7" if status is PhaseStatus.FAILED else None))
    return out


S, F, K, R, P = (PhaseStatus.SUCCEEDED, PhaseStatus.FAILED, PhaseStatus.SKIPPED, PhaseStatus.RUNNING,
                 PhaseStatus.PENDING)
REQUEST = {"service_path": "/srv/services/i-proactive", "service_name": "i-proactive", "auto_register": True,
           "environment_vars": ["ANTHROPIC_API_KEY"], "deployment_method": "docker", "droplet_id": 20}


def job(status: JobStatus, ph: list[PhaseRecord], **kw: Any) -> Job:
    base: dict[str, Any] = dict(id="deploy-abc12345", service="i-proactive", host="prod-1", method="docker",
                                status=status, phases=ph, service_port=8010, droplet_id=20,
                                service_url="http://198.51.100.10:8010",
                                service_path="/opt/fpai/services/i-proactive/releases/r1", request=REQUEST,
                                created_at=T0, started_at=T0)
    return Job(**{**base, **kw})


REGISTRATION = {"droplet_id": 20, "service_name": "i-proactive", "endpoint": "http://198.51.100.10:8010",
                "registered_at": T1}


def test_completed_job_is_the_documented_example() -> None:
    done = job(JobStatus.SUCCEEDED, phases(S, S, S, S, S, S, build={"image": "i-proactive:r1"},
                                           register={"droplet_id": 20}),
               registration=REGISTRATION, completed_at=T1, duration_seconds=64.4)
    body = legacy_job(done).model_dump()
    assert {k: body[k] for k in ("deploy_job_id", "service_name", "service_path", "status", "droplet_id",
                                 "service_port", "service_url", "started_at", "completed_at", "duration_seconds",
                                 "success", "error")} == {
        "deploy_job_id": "deploy-abc12345", "service_name": "i-proactive",
        "service_path": "/srv/services/i-proactive",  # as sent, not the host's release directory
        "status": "completed", "droplet_id": 20, "service_port": 8010, "service_url": "http://198.51.100.10:8010",
        "started_at": "2025-01-14T10:00:00Z", "completed_at": "2025-01-14T10:01:04Z", "duration_seconds": 64,
        "success": True, "error": None}
    assert [(p["phase"], p["status"], p["details"]) for p in body["phases"]] == [
        ("Validation", "success", "Service files validated"),
        ("Transfer", "success", "Files transferred to /opt/fpai/services/i-proactive/releases/r1"),
        ("Build", "success", "Docker image built: i-proactive:r1"),
        ("Start Service", "success", "Docker container started"),
        ("Verify Health", "success", "Service is healthy"),
        ("Register with Registry", "success", "Registered as Droplet #20")]
    assert all(p["duration_seconds"] == 3 and p["started_at"] == "2025-01-14T10:00:00Z"
               and p["completed_at"] == "2025-01-14T10:01:04Z" and p["error"] is None for p in body["phases"])
    assert body["registration"] == {**REGISTRATION, "registered_at": "2025-01-14T10:01:04Z"}


def test_rolled_back_job_is_failed_and_names_failure_and_rollback() -> None:
    rolled = job(JobStatus.ROLLED_BACK, phases(S, S, S, S, F, P), error="Verify Health: not healthy within 6 s",
                 rollback={"release": "r0", "reason": "Verify Health: not healthy"}, registration=REGISTRATION,
                 completed_at=T1, duration_seconds=9.0)
    body = legacy_job(rolled)
    assert (body.status, body.success) == ("failed", False)
    assert body.error == "Verify Health: not healthy within 6 s; rolled back to release r0, which serves again"
    assert [(p.phase, p.status) for p in body.phases][-2:] == [("Verify Health", "failed"),
                                                                ("Register with Registry", "skipped")]
    assert body.phases[-2].error == "exit code 7" and body.phases[-2].details == "Verify Health failed"
    assert body.phases[-1].details.startswith("Not run: Verify Health")
    assert body.registration is None  # the rollback re-registered the old release, not this one


@pytest.mark.parametrize(("rollback", "transient", "tail"), [
    ({"release": "r0", "error": "r0 exited"}, False, "; rollback to release r0 failed: r0 exited"),
    ({"release": None, "reason": "no earlier good release of this service on this host"}, False,
     "; not rolled back: no earlier good release of this service on this host"),
    (None, True, "; not rolled back (host or Registry unreachable): the next reconcile retries"),
    (None, False, ""),
])
def test_failed_job_error_says_what_the_rollback_did(rollback: dict[str, Any] | None, transient: bool,
                                                     tail: str) -> None:
    failed = job(JobStatus.FAILED, phases(S, S, F, P, P, P), error="Build: exit code 7", rollback=rollback,
                 transient=transient, completed_at=T1)
    assert legacy_job(failed).error == "Build: exit code 7" + tail


@pytest.mark.parametrize(("status", "ph", "want"), [
    (JobStatus.PENDING, [], "pending"),
    (JobStatus.RUNNING, phases(P, P, P, P, P, P), "validating"),
    (JobStatus.RUNNING, phases(R, P, P, P, P, P), "validating"),
    (JobStatus.RUNNING, phases(S, R, P, P, P, P), "transferring"),
    (JobStatus.RUNNING, phases(S, K, R, P, P, P), "building"),
    (JobStatus.RUNNING, phases(S, K, K, P, P, P), "starting"),  # between phases: the next one
    (JobStatus.RUNNING, phases(S, S, S, S, R, P), "verifying"),
    (JobStatus.RUNNING, phases(S, S, S, S, S, R), "registering"),
    (JobStatus.SUCCEEDED, phases(S, K, K, S, S, K), "completed"),
    (JobStatus.FAILED, phases(F, P, P, P, P, P), "failed"),
    (JobStatus.INTERRUPTED, phases(S, F, P, P, P, P), "failed"),
    (JobStatus.SUPERSEDED, phases(S, S, P, P, P, P), "failed"),
    (JobStatus.ROLLED_BACK, phases(S, S, S, F, P, P), "failed"),
])
def test_status_takes_only_the_original_values(status: JobStatus, ph: list[PhaseRecord], want: str) -> None:
    body = legacy_job(job(status, ph))
    assert job_status(job(status, ph)) == want == body.status
    assert body.success is (want == "completed")
    # phases carry only the original's three statuses; a running job lists those that ended
    assert {p.status for p in body.phases} <= {"success", "failed", "skipped"}
    ended = [p.phase for p in ph if p.status in (S, F, K)]
    assert [p.phase for p in body.phases] == (ended if not status.finished else [p.phase for p in ph])


def test_skipped_phases_say_why() -> None:
    kept = job(JobStatus.SUCCEEDED, phases(S, K, K, S, S, K, transfer={"skipped": "release already built"}),
               request={**REQUEST, "auto_register": False})
    details = [p.details for p in legacy_job(kept).phases]
    assert details[1] == "Skipped: release already built" and details[2] == "Skipped"
    assert details[5] == "Skipped: auto_register is false"


def test_systemd_details_and_git_job_path() -> None:
    done = job(JobStatus.SUCCEEDED, phases(S, S, S, S, S, S, build={"venv": "/v/r1"},
                                           start={"unit": "deployerd-x.service"}), method="systemd", request=None)
    body = legacy_job(done)
    assert body.phases[2].details == "Virtual environment built: /v/r1"
    assert body.phases[3].details == "systemd unit started: deployerd-x.service"
    assert body.service_path == "/opt/fpai/services/i-proactive/releases/r1"  # a git job: where it runs


def test_created_answer() -> None:
    assert created(job(JobStatus.PENDING, [])).model_dump() == {
        "deploy_job_id": "deploy-abc12345", "service_name": "i-proactive", "status": "pending",
        "created_at": "2025-01-14T10:00:00Z"}


SEED = {"service_path": "/srv/services/i-proactive", "service_name": "i-proactive", "droplet_id": 20,
        "service_port": 8010, "deployment_method": "docker", "environment_vars": {"ANTHROPIC_API_KEY": "sk-..."},
        "auto_register": True, "verification_job_id": "ver-abc123"}


def test_request_takes_every_documented_field_and_defaults() -> None:
    req = DeployRequest.model_validate(SEED)
    spec = service_spec(req, "prod-1", "i-proactive")
    assert (spec.name, spec.port, spec.method, spec.droplet_id, spec.register, spec.env) == (
        "i-proactive", 8010, "docker", 20, True, {"ANTHROPIC_API_KEY": "sk-..."})
    record = req.record()
    assert record["verification_job_id"] == "ver-abc123" and record["service_path"] == SEED["service_path"]
    assert record["environment_vars"] == ["ANTHROPIC_API_KEY"] and "sk-..." not in str(record)
    minimal = DeployRequest.model_validate({k: SEED[k] for k in ("service_path", "service_name", "service_port")})
    assert (minimal.droplet_id, minimal.deployment_method, minimal.environment_vars, minimal.auto_register,
            minimal.verification_job_id) == (None, "docker", {}, True, None)
    assert service_spec(minimal.model_copy(update={"auto_register": False}), "h", "x").register is False


@pytest.mark.parametrize("extra", ["env", "colour"])
def test_unknown_fields_are_refused_by_name(extra: str) -> None:
    with pytest.raises(ValidationError) as e:
        DeployRequest.model_validate({**SEED, extra: {"X": "1"}})
    assert [(err["loc"], err["type"]) for err in e.value.errors()] == [((extra,), "extra_forbidden")]


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"deployment_method": "manual"}, "deployment_method", "'manual' is not supported"),
    ({"environment_vars": {"BAD-KEY": "v4lue"}}, "environment_vars", "BAD-KEY"),
    ({"service_name": "Not_A_Label"}, "service_name", "DNS label"),
    ({"health_path": "no-slash"}, "health_path", "start with '/'"),
])
def test_requests_deployerd_cannot_honour_name_the_request_field(change: dict[str, Any], field: str,
                                                                 words: str) -> None:
    req = DeployRequest.model_validate({**SEED, **change})
    with pytest.raises(Refused) as e:
        service_spec(req, "prod-1", "i-proactive")
    assert [err["loc"][1] for err in e.value.errors] == [field]
    assert words in e.value.errors[0]["msg"] and "v4lue" not in str(e.value.errors)


def test_a_rollout_shows_its_hosts_jobs_and_waves_and_a_one_host_job_never_does() -> None:
    one = legacy_job(job(JobStatus.SUCCEEDED, phases(S, S, S, S, S, S), completed_at=T1)).model_dump()
    assert "children" not in one and "waves" not in one
    rollout = job(JobStatus.ROLLED_BACK, [], kind="rollout", children=["deploy-1", "deploy-2"],
                  waves=[["web-1"], ["web-2", "web-3"]], error="host web-3 failed", completed_at=T1)
    body = legacy_job(rollout).model_dump()
    assert body["children"] == ["deploy-1", "deploy-2"] and body["waves"] == [["web-1"], ["web-2", "web-3"]]
    assert body["status"] == "failed" and body["success"] is False and body["phases"] == []
    assert set(body) == set(one) | {"children", "waves"}
