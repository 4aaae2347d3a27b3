"""`deployerd sandbox up --hosts 3 --swarm`: a real 3-node Swarm whose nodes all trust the manager's registry."""

from __future__ import annotations

import json
import shlex

import pytest

from deployerd import sandbox as sbx

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


async def _run(host: sbx.HostInfo, *argv: str) -> str:
    async with await sbx.connect(host) as conn:
        done = await conn.run(shlex.join(argv), check=True)
        return str(done.stdout)


async def test_three_nodes_ready_and_registry_trusted(swarm_sandbox: sbx.SandboxInfo) -> None:
    swarm = swarm_sandbox.swarm
    assert swarm is not None
    manager, *workers = swarm_sandbox.hosts
    assert (swarm.manager, swarm.workers) == (manager.name, [w.name for w in workers])
    assert swarm.registry == f"{manager.internal_address}:5000"

    nodes = await _run(manager, "docker", "node", "ls", "--format", "{{json .}}")
    listed = [json.loads(line) for line in nodes.splitlines()]
    assert sorted(n["Hostname"] for n in listed) == ["sbx-1", "sbx-2", "sbx-3"]
    assert all(n["Status"] == "Ready" for n in listed)
    assert {n["Hostname"]: n["ManagerStatus"] for n in listed}["sbx-1"] == "Leader"
    assert {n["ID"] for n in listed} == set(swarm.nodes.values())

    # An image pushed on the manager is pulled by a worker from the registry (which it trusts over HTTP).
    ref = f"{swarm.registry}/sandbox-check/busybox:{swarm_sandbox.id}"
    await _run(manager, "docker", "tag", "busybox:latest", ref)
    await _run(manager, "docker", "push", "--quiet", ref)
    await _run(workers[0], "docker", "pull", "--quiet", ref)
    assert (await _run(workers[0], "docker", "image", "inspect", "--format", "{{.Id}}", ref)).strip() == \
        (await _run(manager, "docker", "image", "inspect", "--format", "{{.Id}}", ref)).strip()
    await _run(workers[0], "docker", "image", "rm", ref)
    await _run(manager, "docker", "image", "rm", ref)
