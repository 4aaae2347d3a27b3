"""The sandbox's own life cycle: `up` cleans what a killed run left, `down` leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deployerd import sandbox as sbx

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


async def test_up_cleans_leftovers_and_down_leaves_nothing(sandbox: sbx.SandboxInfo, tmp_path: Path) -> None:
    """A second, one-host sandbox on the same engine as the session's: its life must not touch the other."""
    state = tmp_path / "sbx"
    first = await sbx.up_async(1, state)
    engine = sbx.Engine(first.engine.url)
    old_container = (await engine.inspect(first.hosts[0].container))["Id"]

    # A run killed without `down` leaves its container; the next `up` finds it by its labels and removes it.
    (state / "sandbox.json").unlink()
    info = await sbx.up_async(1, state)
    assert info.id == first.id
    containers = await engine.labelled("container", f"{sbx.LABEL}={info.id}")
    assert old_container not in containers and len(containers) == 1
    assert sbx.load_info(state) == info
    st = await sbx.status_async(state)
    assert [h.state for h in st.hosts] == ["running"] and st.healthy
    assert len(await engine.labelled("volume", f"{sbx.LABEL}={info.id}")) == 1
    host_init = (await engine.inspect(info.hosts[0].container))["State"]["Pid"]
    assert _alive(host_init)

    await sbx.down_async(state)
    assert not _alive(host_init)  # the host's systemd, and with it its sshd and dockerd, are gone
    assert await engine.labelled("container", f"{sbx.LABEL}={info.id}") == []
    assert await engine.labelled("volume", f"{sbx.LABEL}={info.id}") == []
    if info.registry:
        assert not _alive(info.registry.pid)
    assert sbx.load_info(state) is None
    assert not (await sbx.status_async(state)).healthy
    await sbx.down_async(state)  # idempotent

    # The session's sandbox (another id, same engine) is untouched, and so is the engine.
    session = await engine.labelled("container", f"{sbx.LABEL}={sandbox.id}")
    assert len(session) == len(sandbox.hosts)
    assert await engine.answers()
    assert (await sbx.status_async(Path(sandbox.state_dir))).hosts


async def test_sandbox_json_describes_the_hosts(sandbox: sbx.SandboxInfo) -> None:
    info = sbx.load_info(Path(sandbox.state_dir))
    assert info is not None and info.id == sandbox.id
    assert [h.name for h in info.hosts] == ["sbx-1", "sbx-2"]
    assert len({h.ssh_port for h in info.hosts}) == 2
    assert all(h.container == f"deployerd-sbx-{info.id}-{i}" for i, h in enumerate(info.hosts, 1))
    assert all(h.internal_address for h in info.hosts)


async def test_registry_answers(sandbox: sbx.SandboxInfo) -> None:
    import httpx

    if sandbox.registry is None:
        pytest.skip("deployerd.registry not available yet")
    token = Path(sandbox.registry.token_path).read_text().strip()
    assert Path(sandbox.registry.token_path).stat().st_mode & 0o077 == 0
    async with httpx.AsyncClient(timeout=5) as client:
        resp = await client.get(f"{sandbox.registry.url}/droplets", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200
    assert "droplets" in resp.json()
