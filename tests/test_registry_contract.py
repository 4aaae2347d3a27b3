"""The embedded Registry against the contract, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from deployerd.registry import serving

TOKEN = "s3cret-token-for-tests"
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
DROPLET_KEYS = {"id", "name", "steward", "status", "endpoint", "proof", "cost_usd", "yield_usd", "metadata",
                "registered_at", "updated_at"}


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(tmp_path / "registry.db") as url, httpx.AsyncClient(base_url=url) as client:
        yield client


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(tmp_path / "registry.db", token=TOKEN) as url, httpx.AsyncClient(base_url=url) as client:
        yield client


async def post(http: httpx.AsyncClient, name: str, **extra: object) -> httpx.Response:
    return await http.post("/droplets", json={"name": name, "endpoint": f"http://{name}:8000", **extra})


async def test_post_creates_active_droplet_with_full_record(http: httpx.AsyncClient) -> None:
    r = await post(http, "alpha", steward="ops", metadata={"host": "h1"})
    assert r.status_code == 201
    body = r.json()
    assert set(body) == {"droplet", "timestamp"}
    d = body["droplet"]
    assert set(d) == DROPLET_KEYS
    assert d["id"] == 1 and d["name"] == "alpha" and d["steward"] == "ops" and d["status"] == "active"
    assert d["endpoint"] == "http://alpha:8000" and d["metadata"] == {"host": "h1"}
    assert d["proof"] is None and d["cost_usd"] == 0 and d["yield_usd"] == 0
    for ts in (body["timestamp"], d["registered_at"], d["updated_at"]):
        assert ISO_Z.match(ts), ts


async def test_duplicate_name_is_409_with_detail(http: httpx.AsyncClient) -> None:
    assert (await post(http, "alpha")).status_code == 201
    r = await post(http, "alpha")
    assert r.status_code == 409
    assert set(r.json()) == {"detail"} and "alpha" in r.json()["detail"]


async def test_id_counter_rules(http: httpx.AsyncClient) -> None:
    ids = [(await post(http, "a")).json()["droplet"]["id"],
           (await post(http, "b", id=0)).json()["droplet"]["id"],
           (await post(http, "c", id=10)).json()["droplet"]["id"],
           (await post(http, "d")).json()["droplet"]["id"],
           (await post(http, "e", id=5)).json()["droplet"]["id"],  # below the counter: used, counter unchanged
           (await post(http, "f")).json()["droplet"]["id"]]
    assert ids == [1, 2, 10, 11, 5, 12]
    taken = await post(http, "g", id=10)
    assert taken.status_code == 409
    deleted = await http.delete("/droplets/12")
    assert deleted.status_code == 200
    assert (await post(http, "h")).json()["droplet"]["id"] == 13  # ids are never reused


async def test_list_and_gets(http: httpx.AsyncClient) -> None:
    await post(http, "alpha")
    await post(http, "beta")
    r = await http.get("/droplets")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"droplets", "total", "timestamp"} and ISO_Z.match(body["timestamp"])
    assert body["total"] == 2 and [d["name"] for d in body["droplets"]] == ["alpha", "beta"]
    by_id = await http.get("/droplets/2")
    assert by_id.status_code == 200 and set(by_id.json()) == {"droplet", "timestamp"}
    assert by_id.json()["droplet"]["name"] == "beta"
    by_name = await http.get("/droplets/name/alpha")
    assert by_name.status_code == 200 and by_name.json()["droplet"]["id"] == 1
    assert (await http.get("/droplets/99")).status_code == 404
    missing = await http.get("/droplets/name/nobody")
    assert missing.status_code == 404 and "detail" in missing.json()


async def test_patch_replaces_metadata_and_only_sent_fields(http: httpx.AsyncClient) -> None:
    created = (await post(http, "alpha", metadata={"a": 1, "b": 2})).json()["droplet"]
    r = await http.patch("/droplets/1", json={"metadata": {"c": 3}})
    assert r.status_code == 200 and set(r.json()) == {"droplet", "timestamp"}
    assert r.json()["droplet"]["metadata"] == {"c": 3}  # replaced, not merged
    r = await http.patch("/droplets/1", json={"status": "inactive", "proof": "p", "cost_usd": 1.5, "yield_usd": 2})
    d = r.json()["droplet"]
    assert d["status"] == "inactive" and d["proof"] == "p" and d["cost_usd"] == 1.5 and d["yield_usd"] == 2
    assert d["metadata"] == {"c": 3} and d["endpoint"] == created["endpoint"]  # untouched fields kept
    assert d["registered_at"] == created["registered_at"] and ISO_Z.match(d["updated_at"])
    assert d["updated_at"] >= created["updated_at"]
    r = await http.patch("/droplets/1", json={"endpoint": "http://new:9000", "metadata": None})
    assert r.json()["droplet"]["endpoint"] == "http://new:9000" and r.json()["droplet"]["metadata"] is None
    assert (await http.get("/droplets/1")).json()["droplet"]["endpoint"] == "http://new:9000"
    assert (await http.patch("/droplets/42", json={"status": "active"})).status_code == 404


async def test_delete(http: httpx.AsyncClient) -> None:
    await post(http, "alpha")
    r = await http.delete("/droplets/1")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"success", "message", "deleted_at"} and body["success"] is True
    assert ISO_Z.match(body["deleted_at"])
    assert (await http.get("/droplets/1")).status_code == 404
    assert (await http.delete("/droplets/1")).status_code == 404


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/droplets", {"endpoint": "http://x"}),  # no name
    ("POST", "/droplets", {"name": "x"}),  # no endpoint
    ("POST", "/droplets", {"name": "", "endpoint": "http://x"}),
    ("POST", "/droplets", {"name": "x", "endpoint": "http://x", "id": "seven"}),
    ("POST", "/droplets", {"name": "x", "endpoint": "http://x", "id": -1}),
    ("POST", "/droplets", {"name": "x", "endpoint": "http://x", "metadata": [1]}),
    ("PATCH", "/droplets/1", {"status": "bogus"}),
    ("PATCH", "/droplets/1", {"endpoint": None}),
    ("PATCH", "/droplets/1", {"cost_usd": "lots"}),
    ("GET", "/droplets/abc", None),
    ("DELETE", "/droplets/abc", None),
])
async def test_bad_input_is_422_with_details(http: httpx.AsyncClient, method: str, path: str, body: object) -> None:
    await post(http, "existing")
    r = await http.request(method, path, json=body)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail and "msg" in detail[0]


async def test_restart_keeps_records_and_counter(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    async with serving(db) as url, httpx.AsyncClient(base_url=url) as http:
        await post(http, "alpha", metadata={"k": "v"})
        await post(http, "beta", id=7)
        await http.delete("/droplets/7")  # the highest id is gone: only the stored counter remembers it
        before = (await http.get("/droplets")).json()["droplets"]
    async with serving(db) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/droplets")).json()["droplets"] == before
        assert (await post(http, "gamma")).json()["droplet"]["id"] == 8
        assert (await post(http, "alpha")).status_code == 409


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}])
async def test_token_guards_every_write(secured: httpx.AsyncClient, headers: dict[str, str]) -> None:
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert (await secured.post("/droplets", json={"name": "a", "endpoint": "e"}, headers=good)).status_code == 201
    refused = [
        await secured.post("/droplets", json={"name": "b", "endpoint": "e"}, headers=headers),
        await secured.post("/droplets", json={"bad": "body"}, headers=headers),  # auth before validation
        await secured.patch("/droplets/1", json={"status": "error"}, headers=headers),
        await secured.delete("/droplets/1", headers=headers),
        await secured.post("/message", json=_message(), headers=headers),
    ]
    for r in refused:
        assert r.status_code == 401, (r.request.method, r.request.url)
        assert r.headers["www-authenticate"] == "Bearer" and TOKEN not in r.text
    unchanged = await secured.get("/droplets/1")  # reads stay open
    assert unchanged.status_code == 200 and unchanged.json()["droplet"]["status"] == "active"
    assert (await secured.get("/droplets")).json()["total"] == 1
    assert (await secured.get("/droplets/name/a")).status_code == 200
    assert (await secured.get("/health")).status_code == 200
    assert (await secured.patch("/droplets/1", json={"status": "error"}, headers=good)).status_code == 200
    assert (await secured.post("/message", json=_message(), headers=good)).status_code == 200
    assert (await secured.delete("/droplets/1", headers=good)).status_code == 200


def _message(message_type: str = "status") -> dict[str, object]:
    return {"trace_id": "t-1", "source": "deployerd", "target": "registry", "message_type": message_type,
            "payload": {"x": 1}, "timestamp": "2024-01-01T00:00:00Z"}


async def test_udc_endpoints(http: httpx.AsyncClient) -> None:
    health = (await http.get("/health")).json()
    assert set(health) == {"status", "service", "version", "timestamp"}
    assert health["status"] == "active" and health["service"] == "registry" and ISO_Z.match(health["timestamp"])
    caps = (await http.get("/capabilities")).json()
    assert set(caps) == {"version", "features", "dependencies", "udc_version", "metadata"}
    assert caps["udc_version"] == "1.0" and "droplets" in caps["features"] and caps["dependencies"] == ["sqlite"]
    assert caps["version"] == health["version"] and caps["metadata"] == {}
    deps = (await http.get("/dependencies")).json()
    assert deps == {"required": [{"name": "sqlite", "status": "active"}], "optional": [], "missing": []}
    state1 = (await http.get("/state")).json()
    assert {"uptime_seconds", "requests_total", "errors_last_hour"} <= set(state1)
    assert all(isinstance(state1[k], int) for k in ("uptime_seconds", "requests_total", "errors_last_hour"))
    assert state1["errors_last_hour"] == 0 and ISO_Z.match(state1["last_restart"])
    await http.get("/droplets/404")
    state2 = (await http.get("/state")).json()
    assert state2["requests_total"] == state1["requests_total"] + 2  # the 404 and this /state call
    receipt = await http.post("/message", json=_message("command"))
    assert receipt.status_code == 200
    body = receipt.json()
    assert set(body) == {"received", "trace_id", "processed_at", "result"}
    assert body["received"] is True and body["trace_id"] == "t-1" and body["result"] == "success"
    assert ISO_Z.match(body["processed_at"])
    assert (await http.post("/message", json=_message("shout"))).status_code == 422


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        for _ in range(300):
            assert proc.poll() is None, "registry process exited"
            try:
                if (await http.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                await asyncio.sleep(0.05)
    raise AssertionError(f"registry at {url} never answered")


@pytest.mark.parametrize("via", ["token-file", "env"])
async def test_module_entrypoint_serves_with_token(tmp_path: Path, via: str) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "deployerd.registry", "serve", "--db", str(tmp_path / "r.db"),
           "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "DEPLOYERD_REGISTRY_TOKEN"}
    if via == "token-file":
        (tmp_path / "token").write_text(TOKEN + "\n")
        cmd += ["--token-file", str(tmp_path / "token")]
    else:
        env["DEPLOYERD_REGISTRY_TOKEN"] = TOKEN
    proc = await asyncio.to_thread(subprocess.Popen, cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        await _wait_up(url, proc)
        async with httpx.AsyncClient(base_url=url) as http:
            body = {"name": "a", "endpoint": "e"}
            assert (await http.post("/droplets", json=body)).status_code == 401
            ok = await http.post("/droplets", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 201
    finally:
        proc.terminate()
        output, _ = await asyncio.to_thread(proc.communicate, timeout=30)
    assert TOKEN.encode() not in output
