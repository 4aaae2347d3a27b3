"""RegistryClient against the real embedded Registry (and small misbehaving ones) over loopback HTTP."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, HTTPException

from deployerd.observed import RegistryEntry
from deployerd.registry import serving, serving_app
from deployerd.registry_client import RegistryClient, RegistryError

TOKEN = "client-test-token-123"


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[str]:
    async with serving(tmp_path / "registry.db", token=TOKEN) as url:
        yield url


@pytest.fixture
async def client(registry: str) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(registry, token=TOKEN, timeout=10) as c:
        yield c


async def test_register_new(client: RegistryClient) -> None:
    entry = await client.register("web", "http://h1:8080", {"host": "h1", "release": "r1"}, None)
    assert isinstance(entry, RegistryEntry)
    assert (entry.name, entry.endpoint, entry.status) == ("web", "http://h1:8080", "active")
    assert entry.metadata == {"host": "h1", "release": "r1"} and entry.id == 1
    assert await client.get_by_name("web") == entry


async def test_register_with_droplet_id(client: RegistryClient) -> None:
    entry = await client.register("api", "http://h2:9000", {}, droplet_id=42)
    assert entry.id == 42 and entry.metadata == {}


async def test_register_existing_updates_through_409_path(client: RegistryClient, registry: str) -> None:
    first = await client.register("web", "http://h1:8080", {"release": "r1", "old": True}, None)
    async with httpx.AsyncClient(base_url=registry, headers={"Authorization": f"Bearer {TOKEN}"}) as raw:
        r = await raw.patch(f"/droplets/{first.id}", json={"status": "error"})
        assert r.status_code == 200
    again = await client.register("web", "http://h2:8081", {"release": "r2"}, None)
    assert again.id == first.id  # updated in place, not duplicated
    assert (again.endpoint, again.status, again.metadata) == ("http://h2:8081", "active", {"release": "r2"})
    listed = await client.list()
    assert list(listed) == ["web"] and listed["web"] == again


async def test_deregister(client: RegistryClient) -> None:
    await client.register("web", "http://h1:8080", {}, None)
    await client.register("db", "http://h1:5432", {}, None)
    assert await client.deregister("web") is True
    assert await client.get_by_name("web") is None
    assert await client.deregister("web") is False
    assert set(await client.list()) == {"db"}


async def test_list_empty_then_several(client: RegistryClient) -> None:
    assert await client.list() == {}
    for i in range(3):
        await client.register(f"svc{i}", f"http://h:{8000 + i}", {"i": i}, None)
    listed = await client.list()
    assert sorted(listed) == ["svc0", "svc1", "svc2"]
    assert listed["svc2"].endpoint == "http://h:8002" and listed["svc2"].metadata == {"i": 2}


async def test_registry_down_is_transient_and_names_url() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with RegistryClient(url, token=TOKEN, timeout=5) as c:
        for call in (c.list(), c.get_by_name("web"), c.register("web", "http://x", {}, None), c.deregister("web")):
            with pytest.raises(RegistryError) as info:
                await call
            assert info.value.transient is True
            assert url in str(info.value) and TOKEN not in str(info.value)


@pytest.mark.parametrize("token", [None, "wrong-token"])
async def test_bad_token_is_not_transient_and_never_echoed(registry: str, token: str | None) -> None:
    async with RegistryClient(registry, token=token) as c:
        assert await c.list() == {}  # reads are open
        with pytest.raises(RegistryError) as info:
            await c.register("web", "http://x", {}, None)
    err = info.value
    assert err.transient is False and err.status_code == 401
    assert registry in str(err) and "register 'web'" in str(err)
    assert TOKEN not in str(err) and (token is None or token not in str(err))


async def test_server_error_is_transient() -> None:
    app = FastAPI()

    @app.get("/droplets")
    async def broken() -> None:
        raise HTTPException(503, "database locked")

    async with serving_app(app) as url, RegistryClient(url) as c:
        with pytest.raises(RegistryError) as info:
            await c.list()
    assert info.value.transient is True and info.value.status_code == 503
    assert "database locked" in str(info.value) and url in str(info.value)


async def test_a_read_is_asked_again_once_a_write_is_not() -> None:
    """One 5xx (or a kept-alive connection closed as it was reused) must not make the Registry look down until
    the next reconcile: a read is asked twice. A write is not repeated here: the phase runner retries it."""
    app = FastAPI()
    calls = {"GET": 0, "POST": 0}

    @app.get("/droplets")
    async def flaky() -> dict:
        calls["GET"] += 1
        if calls["GET"] == 1:
            raise HTTPException(500, "once")
        return {"droplets": [], "timestamp": "t"}

    @app.post("/droplets")
    async def failing(body: dict) -> None:
        calls["POST"] += 1
        raise HTTPException(500, "always")

    async with serving_app(app) as url, RegistryClient(url) as c:
        assert await c.list() == {}
        assert calls["GET"] == 2
        with pytest.raises(RegistryError) as info:
            await c.register("web", "http://h:1", {}, None)
    assert info.value.transient is True and calls["POST"] == 1


async def test_register_fails_when_confirmation_disagrees() -> None:
    """A Registry that acknowledges a write it did not store must not pass as registered."""
    app = FastAPI()
    stale = {"id": 3, "name": "web", "endpoint": "http://old:1", "status": "active", "metadata": {}}

    @app.post("/droplets", status_code=201)
    async def create(body: dict) -> dict:
        return {"droplet": {**stale, "endpoint": body["endpoint"]}, "timestamp": "t"}

    @app.get("/droplets/{droplet_id}")
    async def get(droplet_id: int) -> dict:
        return {"droplet": stale, "timestamp": "t"}

    async with serving_app(app) as url, RegistryClient(url) as c:
        with pytest.raises(RegistryError) as info:
            await c.register("web", "http://new:2", {}, None)
    assert info.value.transient is False and "does not match" in str(info.value)
