"""Shared fixtures: real test hosts from deployerd.sandbox (systemd + sshd + dockerd in a container).

The session brings up one sandbox of 2 hosts in a temporary state dir and takes it down at the end; with
DEPLOYERD_TEST_SANDBOX=<state dir> it reuses a sandbox already up there (and leaves it running), which makes
repeated e2e runs take seconds. The host image is built once and cached (see deployerd.sandbox).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import property_profiles
import pytest
import pytest_asyncio

from deployerd import sandbox as sbx
from deployerd.connection import Connection, HostAddress

property_profiles.load()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def sandbox(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[sbx.SandboxInfo]:
    """A running sandbox with 2 hosts (and the Registry once deployerd.registry exists)."""
    if reuse := os.environ.get("DEPLOYERD_TEST_SANDBOX"):
        info = sbx.load_info(Path(reuse))
        if info is None or len(info.hosts) < 2:
            pytest.fail(f"DEPLOYERD_TEST_SANDBOX={reuse}: no sandbox with 2 hosts is up there")
        yield info
        return
    state_dir = tmp_path_factory.mktemp("sandbox")
    info = await sbx.up_async(2, state_dir)
    try:
        yield info
    finally:
        await sbx.down_async(state_dir)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def swarm_sandbox(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[sbx.SandboxInfo]:
    """A sandbox of 3 hosts formed into a Swarm (sbx-1 its manager, with the image registry).

    DEPLOYERD_TEST_SWARM_SANDBOX=<state dir> reuses one from `deployerd sandbox up --hosts 3 --swarm`."""
    if reuse := os.environ.get("DEPLOYERD_TEST_SWARM_SANDBOX"):
        info = sbx.load_info(Path(reuse))
        if info is None or info.swarm is None or len(info.hosts) < 3:
            pytest.fail(f"DEPLOYERD_TEST_SWARM_SANDBOX={reuse}: no 3-host Swarm sandbox is up there")
        yield info
        return
    state_dir = tmp_path_factory.mktemp("swarm-sandbox")
    info = await sbx.up_async(3, state_dir, swarm=True)
    try:
        yield info
    finally:
        await sbx.down_async(state_dir)


@pytest.fixture(scope="session")
def fleet_sandbox(request: pytest.FixtureRequest) -> sbx.SandboxInfo:
    """3 hosts for the fleet tests: the Swarm sandbox's nodes, used as plain hosts (their engines run plain
    containers and systemd units beside the Swarm's), so `make test` boots no sandbox for them alone.

    DEPLOYERD_TEST_FLEET_SANDBOX=<state dir> reuses any sandbox of 3 hosts (`deployerd sandbox up --hosts 3`)."""
    if reuse := os.environ.get("DEPLOYERD_TEST_FLEET_SANDBOX"):
        info = sbx.load_info(Path(reuse))
        if info is None or len(info.hosts) < 3 or info.registry is None:
            pytest.fail(f"DEPLOYERD_TEST_FLEET_SANDBOX={reuse}: no sandbox with 3 hosts and a Registry is up there")
        return info
    swarm: sbx.SandboxInfo = request.getfixturevalue("swarm_sandbox")
    return swarm


@pytest_asyncio.fixture(loop_scope="session")
async def conn(sandbox: sbx.SandboxInfo) -> AsyncIterator[Connection]:
    """An SSH connection to the sandbox's first host (its key checked against the sandbox's known_hosts)."""
    h = sandbox.hosts[0]
    c = await Connection.open(HostAddress(name=str(h.name), address=str(h.address), port=int(h.ssh_port),
                                          user=str(h.user), key_path=str(h.key_path), known_hosts=str(h.known_hosts)))
    try:
        yield c
    finally:
        await c.close()
