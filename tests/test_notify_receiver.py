"""Notifications delivered over real HTTP to a receiver on loopback (tests/notify_receiver.py). It is a
receiver that checks each API's documented request shape, NOT the real GitHub, Gitea, GitLab or Slack.

Events are published on a real EventBus, as the engine and the phase runner do; the Notifier reads them off
its own task."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from notify_receiver import Receiver, serve
from pydantic import TypeAdapter

from deployerd.config import Destination, Settings
from deployerd.events import EventBus, JobEnded, JobStarted, Quarantined
from deployerd.metrics import Metrics
from deployerd.notify import Notifier
from deployerd.store import Job, JobStatus

SHA = "c0ffee" + "0" * 34


def private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(tokens={k: secrets.token_urlsafe(16) for k in ("github", "gitea", "gitlab", "webhook")})
    server = serve(r)
    try:
        yield r
    finally:
        for event in r.hold.values():
            event.set()
        server.shutdown()
        server.server_close()


def destinations(tmp: Path, r: Receiver, **only: Any) -> list[Destination]:
    base = f"http://127.0.0.1:{r.port}"
    raw = [
        {"kind": "github", "name": "gh", "api_url": f"{base}/gh", "repo": "ops/desired-state",
         "token_file": private(tmp / "gh.token", r.tokens["github"]), "target_url": "https://d.example/ui/{service}"},
        {"kind": "gitea", "name": "gitea", "api_url": f"{base}/gitea", "repo": "ops/desired-state",
         "token_file": private(tmp / "gitea.token", r.tokens["gitea"])},
        {"kind": "gitlab", "name": "gl", "api_url": f"{base}/gl", "repo": "ops/desired-state",
         "token_file": private(tmp / "gl.token", r.tokens["gitlab"])},
        {"kind": "slack", "name": "chat", "url_file": private(tmp / "slack.url", f"{base}/slack/T0/B0/XXXX")},
        {"kind": "webhook", "name": "hook", "url_file": private(tmp / "hook.url", f"{base}/hook"),
         "secret_file": private(tmp / "hook.secret", r.tokens["webhook"])},
    ]
    adapter: TypeAdapter[Destination] = TypeAdapter(Destination)  # type: ignore[arg-type]
    return [adapter.validate_python({**d, **only.get(d["name"], {})}) for d in raw]


def job(status: JobStatus, release: str = "r1", **kw: Any) -> Job:
    return Job(service="web", host="h1", release=release, commit=SHA, status=status, **kw)


def count(m: Metrics, dest: str, result: str) -> float:
    for fam in m.registry.collect():
        for s in fam.samples:
            if s.name == "deployerd_notifications_total" and s.labels["destination"] == dest \
                    and s.labels["result"] == result:
                return s.value
    raise AssertionError(f"no series for {dest} {result}")


async def test_each_destination_gets_its_documented_request(tmp_path: Path, receiver: Receiver) -> None:
    bus, metrics = EventBus(), Metrics()
    notifier = Notifier(destinations(tmp_path, receiver), metrics, backoff_s=0.01)
    notifier.start(bus)
    bus.publish(JobStarted(job=job(JobStatus.RUNNING)))
    bus.publish(JobEnded(job=job(JobStatus.SUCCEEDED)))
    bus.publish(JobStarted(job=job(JobStatus.RUNNING, "r2")))
    bus.publish(JobEnded(job=job(JobStatus.ROLLED_BACK, "r2", error="health check failed",
                                 rollback={"release": "r1"})))
    bus.publish(Quarantined(service="web", release="r2", reason="health check failed"))  # the same failure
    await notifier.drain()
    await notifier.close()

    rejected = [(r.api, r.path, r.problems) for r in receiver.received if r.problems]
    assert not rejected, rejected
    assert [r.json["state"] for r in receiver.of("github")] == ["pending", "success", "pending", "failure"]
    assert [r.json["state"] for r in receiver.of("gitea")] == ["pending", "success", "pending", "failure"]
    assert [r.json["state"] for r in receiver.of("gitlab")] == ["pending", "success", "pending", "failed"]
    gh = receiver.of("github")[0]
    assert gh.path == f"/gh/repos/ops/desired-state/statuses/{SHA}"
    assert gh.json["context"] == "deployerd/web" and gh.json["target_url"] == "https://d.example/ui/web"
    assert receiver.of("gitlab")[0].path == f"/gl/api/v4/projects/ops%2Fdesired-state/statuses/{SHA}"
    assert receiver.of("gitlab")[0].json["name"] == "deployerd/web"
    assert receiver.of("gitea")[0].path == f"/gitea/api/v1/repos/ops/desired-state/statuses/{SHA}"
    texts = [r.json["text"] for r in receiver.of("slack")]
    assert len(texts) == 4 and "web failed" in texts[3] and "rolled back to r1" in texts[3], texts
    hooks = [r.json for r in receiver.of("webhook")]
    assert [h["outcome"] for h in hooks] == ["pending", "success", "pending", "failure"]
    assert hooks[3]["release"] == "r2" and hooks[3]["commit"] == SHA and hooks[3]["service"] == "web"
    assert count(metrics, "gh", "sent") == 4 and count(metrics, "gh", "failed") == 0


async def test_the_receiver_rejects_a_wrong_shape(tmp_path: Path, receiver: Receiver) -> None:
    """The receiver's checks can fail: a wrong token and a wrong signature are refused and counted."""
    bus, metrics = EventBus(), Metrics()
    dests = destinations(tmp_path, receiver)
    private(tmp_path / "gh.token", "not-the-token")
    private(tmp_path / "hook.secret", "not-the-secret")
    notifier = Notifier(dests, metrics, backoff_s=0.01)
    notifier.start(bus)
    bus.publish(JobEnded(job=job(JobStatus.SUCCEEDED)))
    await notifier.drain()
    await notifier.close()
    assert receiver.of("github")[0].problems == ["Authorization is not 'Bearer <token>'"]
    assert receiver.of("webhook")[0].problems == ["bad signature"]
    assert len(receiver.of("github")) == 1  # a 422 is not retried: the request itself is wrong
    assert count(metrics, "gh", "failed") == 1 and count(metrics, "hook", "failed") == 1
    assert count(metrics, "gitea", "sent") == 1


async def test_a_failing_destination_is_retried_bounded_counted_and_holds_nobody(
        tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.status_override["/slack/"] = 503
    gate = receiver.hold["/hook"] = threading.Event()  # the webhook's receiver hangs until released
    bus, metrics = EventBus(), Metrics()
    notifier = Notifier(destinations(tmp_path, receiver), metrics, backoff_s=0.01)
    notifier.start(bus)
    caplog.set_level(logging.WARNING)
    for event in (JobStarted(job=job(JobStatus.RUNNING)), JobEnded(job=job(JobStatus.SUCCEEDED))):
        bus.publish(event)  # synchronous: it returns while the webhook's receiver hangs
    assert bus.subscriber_errors == 0
    for _ in range(200):  # bounded: the other destinations go on while one hangs
        if len(receiver.of("github")) == 2 and count(metrics, "chat", "failed") == 2:
            break
        await asyncio.sleep(0.05)
    assert [r.json["state"] for r in receiver.of("github")] == ["pending", "success"]
    assert len(receiver.of("webhook")) == 1  # still the first, held
    assert len(receiver.of("slack")) == 2 * 4  # two messages, each tried 4 times (1 + 3 retries), then given up
    assert count(metrics, "chat", "failed") == 2 and count(metrics, "chat", "sent") == 0
    assert "HTTP 503" in caplog.text
    assert "XXXX" not in caplog.text  # the Slack URL (its token) is never logged
    gate.set()
    await notifier.drain()
    await notifier.close()
    assert count(metrics, "hook", "sent") == 2


async def test_a_token_file_others_can_read_is_refused(tmp_path: Path, receiver: Receiver,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    dests = destinations(tmp_path, receiver)
    (tmp_path / "gl.token").chmod(0o644)
    bus, metrics = EventBus(), Metrics()
    notifier = Notifier(dests, metrics, backoff_s=0.01)
    notifier.start(bus)
    caplog.set_level(logging.WARNING)
    bus.publish(JobEnded(job=job(JobStatus.SUCCEEDED)))
    await notifier.drain()
    await notifier.close()
    assert receiver.of("gitlab") == []
    assert count(metrics, "gl", "failed") == 1
    assert "gl.token" in caplog.text and "must not be readable by others" in caplog.text
    assert receiver.tokens["gitlab"] not in caplog.text


def test_destinations_come_from_the_config_file(tmp_path: Path) -> None:
    s = Settings(notifications=[
        {"kind": "github", "name": "gh", "api_url": "https://api.github.com", "repo": "o/r",
         "token_file": "/etc/deployerd/gh.token"},
        {"kind": "slack", "name": "chat", "url_file": "/etc/deployerd/slack.url", "reminder_s": 600},
    ])
    assert [d.kind for d in s.notifications] == ["github", "slack"]
    with pytest.raises(ValueError, match="unique"):
        Settings(notifications=[{"kind": "slack", "name": "x", "url_file": "/a"},
                                {"kind": "slack", "name": "x", "url_file": "/b"}])
    with pytest.raises(ValueError, match="owner/name"):
        Settings(notifications=[{"kind": "gitea", "name": "g", "api_url": "https://g", "repo": "norepo",
                                 "token_file": "/t"}])
