"""The daemon's HTTP API fuzzed from its own OpenAPI schema (schemathesis): no request may get a 5xx.

A real engine (store, git source, Registry client) behind ``create_app``, pointed at a local git repository
whose hosts.yaml lists no hosts and at a Registry served in-process, so nothing reaches SSH. The engine and
the Registry live on one background event loop; every generated case is sent to the app through httpx's
ASGI transport on that loop, with and without the API token.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from property_profiles import examples
from schemathesis.checks import not_a_server_error

from deployerd.api import create_app
from deployerd.config import Settings
from deployerd.daemon import close_engine, open_engine
from deployerd.registry.server import serving
from deployerd.source import Kick
from deployerd.store import Job, JobStatus

T = TypeVar("T")
EXAMPLES_PER_OPERATION = 25


class _Loop:
    """One event loop in a thread: the engine, the Registry and every request run on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_Loop, Any, str]]:
    tmp = tmp_path_factory.mktemp("apifuzz")
    repo = tmp / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "hosts.yaml").write_text("hosts: {}\n")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "no hosts")
    token, reg_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    for name, value in (("api.token", token), ("webhook.secret", secrets.token_urlsafe(16)),
                        ("registry.token", reg_token)):
        (tmp / name).write_text(value)
        (tmp / name).chmod(0o600)
    loop = _Loop()
    registry = serving(tmp / "registry.db", reg_token)
    url = loop.run(registry.__aenter__())
    settings_ = Settings(repo_url=str(repo), branch="main", state_dir=tmp / "state", instance="fuzz",
                         registry_url=url, registry_token_file=tmp / "registry.token",
                         api_token_file=tmp / "api.token", webhook_secret_file=tmp / "webhook.secret",
                         poll_interval_s=3600, resync_interval_s=3600)
    engine = loop.run(open_engine(settings_))
    try:
        app = create_app(engine)
        app.state.engine = engine  # for the tests' own checks
        yield loop, app, token
    finally:
        loop.run(close_engine(engine))
        loop.run(registry.__aexit__(None, None, None))
        loop.close()


def _send(loop: _Loop, app: Any, kwargs: dict[str, Any]) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://deployerd") as c:
            return await c.request(**kwargs)

    return loop.run(go())


def _operations(app: Any) -> list[Any]:
    schema = schemathesis.openapi.from_dict(app.openapi())
    return [op.ok() for op in schema.get_all_operations()]


def test_every_operation_is_fuzzed(daemon: tuple[_Loop, Any, str]) -> None:
    _, app, _ = daemon
    paths = {(op.method.upper(), op.path) for op in _operations(app)}
    assert {("POST", "/deploy"), ("POST", "/sync"), ("POST", "/webhook"), ("GET", "/services/{name}"),
            ("GET", "/deploy/{job_id}"), ("GET", "/health")} <= paths


@pytest.mark.parametrize("with_token", [False, True], ids=["no-token", "token"])
def test_no_server_error_from_schema_cases(daemon: tuple[_Loop, Any, str], with_token: bool) -> None:
    loop, app, token = daemon
    headers = {"Authorization": f"Bearer {token}"} if with_token else {}
    sent = 0
    for op in _operations(app):
        @settings(max_examples=examples(EXAMPLES_PER_OPERATION), deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case: Any) -> None:
            nonlocal sent
            kwargs = case.as_transport_kwargs(base_url="http://deployerd", headers=headers)
            kwargs = {k: v for k, v in kwargs.items()
                      if k in ("method", "url", "params", "headers", "cookies", "content", "data", "json", "files")}
            response = _send(loop, app, kwargs)
            sent += 1
            case.validate_response(response, checks=[not_a_server_error])

        run()
    assert sent >= len(_operations(app))


@pytest.mark.parametrize(("limit", "status"), [("-9223372036854775809", 422), ("-1", 422), ("0", 422),
                                               ("9223372036854775808", 404), ("201", 404), ("1", 404)])
def test_history_limit_out_of_range_is_not_500(daemon: tuple[_Loop, Any, str], limit: str, status: int) -> None:
    """Found by the fuzz: a limit below SQLite's 64-bit range raised OverflowError (500), and a negative one
    meant 'no limit' to SQLite; large ones are still capped at 200 (and reach the lookup: service x is unknown
    here, so 404)."""
    loop, app, _ = daemon
    response = _send(loop, app, {"method": "GET", "url": "/services/x/history", "params": {"limit": limit}})
    assert response.status_code == status, response.text


def _push(branch: str = "main") -> bytes:
    return b'{"ref": "refs/heads/%s", "after": "%s"}' % (branch.encode(), b"a" * 40)


def test_webhook_refusals_trigger_no_fetch(daemon: tuple[_Loop, Any, str]) -> None:
    """Missing, wrong or tampered signatures and oversized bodies are refused and wake nothing (no fetch);
    a correctly signed push (the control) does."""
    import hashlib
    import hmac

    loop, app, _ = daemon
    engine = app.state.engine
    engine.kick = kick = Kick()  # fresh: the fuzz's /sync calls may have left the old one set
    revision = engine.source.revision
    secret = engine.settings.secret("webhook_secret") or ""
    body = _push()
    good = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    refused = [
        ({}, body, 401),
        ({"X-Hub-Signature-256": "sha256=" + "0" * 64}, body, 401),
        ({"X-Hub-Signature-256": good}, body + b" ", 401),
        ({"X-Gitea-Signature": good.removeprefix("sha256=")[::-1]}, body, 401),
        ({"X-Gitlab-Token": secret + "x"}, body, 401),
        ({"X-Hub-Signature-256": good}, b"x" * ((1 << 20) + 1), 413),
    ]
    for headers, content, status in refused:
        response = _send(loop, app, {"method": "POST", "url": "/webhook", "headers": headers, "content": content})
        assert response.status_code == status, (headers, response.text)
        assert not kick.is_set(), headers
        assert engine.source.revision == revision
    ok = _send(loop, app, {"method": "POST", "url": "/webhook", "headers": {"X-Hub-Signature-256": good},
                           "content": body})
    assert ok.status_code == 200 and ok.json()["accepted"] is True
    assert kick.is_set()


def test_get_deploy_keeps_the_older_shape_and_a_rollout_adds_its_hosts(daemon: tuple[_Loop, Any, str]) -> None:
    loop, app, _ = daemon
    store = app.state.engine.store
    one = Job(service="web", host="h", status=JobStatus.SUCCEEDED)
    rollout = Job(service="fleet", host="h1", kind="rollout", status=JobStatus.RUNNING, children=[one.id],
                  waves=[["h1"], ["h2"]])
    for job in (one, rollout):
        loop.run(store.save_job(job))
    body = _send(loop, app, {"method": "GET", "url": f"/deploy/{one.id}"}).json()
    assert "children" not in body and "waves" not in body and body["status"] == "completed"
    body = _send(loop, app, {"method": "GET", "url": f"/deploy/{rollout.id}"}).json()
    assert body["children"] == [one.id] and body["waves"] == [["h1"], ["h2"]]
