"""Two hosts.yaml entries for one machine: each would see the other's services as its own and prune them as
"moved". Refused at validation (same address and port) and at observation (same SSH host key): nothing runs
less, nothing is pruned, the error names both entries."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from daemon_harness import DesiredRepo, containers_of, http_get, running_daemon, settings_for

from deployerd.plan import ActionKind
from deployerd.sandbox import SandboxInfo

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


def add_host(repo: DesiredRepo, name: str, **body: object) -> None:
    hosts = yaml.safe_load((repo.path / "hosts.yaml").read_text())
    hosts["hosts"][name] = body
    repo.write("hosts.yaml", yaml.safe_dump(hosts))


async def test_alias_with_same_address_and_port_is_refused(sandbox: SandboxInfo, tmp_path: Path) -> None:
    h = sandbox.hosts[0]
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("alias-web", 8151)
    repo.commit("one service")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        sbx1 = d.engine.desired.hosts["sbx-1"]
        original = (repo.path / "hosts.yaml").read_text()
        add_host(repo, "sbx-1b", address=h.address, ssh_port=h.ssh_port, user=h.user)
        repo.commit("an alias of sbx-1")
        for _ in range(2):  # it used to flap: prune, deploy, prune...
            actions = await d.reconcile()
            assert not [a for a in actions if a.kind is ActionKind.PRUNE], actions
            assert [c["State"] for c in await containers_of(d, sbx1, "alias-web")] == ["running"]
        errors = [str(e) for e in d.engine.desired.errors]
        assert any(e.startswith("hosts.yaml: hosts.sbx-1b: reaches the same machine as sbx-1") for e in errors), errors
        assert any(e.startswith("hosts.yaml: hosts.sbx-1: reaches the same machine as sbx-1b") for e in errors), errors
        assert "alias-web v1" in (await http_get(f"http://{h.internal_address}:8151/")).text
        repo.write("hosts.yaml", original)  # whole again, so the harness's clean-up sees the host
        repo.commit("alias removed")
        await d.reconcile()


async def test_alias_by_another_address_is_seen_by_its_host_key(sandbox: SandboxInfo, tmp_path: Path) -> None:
    h = sandbox.hosts[0]
    # the same machine at its container address, port 22: validation cannot tell, the host key can
    port_line = next(line for line in Path(h.known_hosts).read_text().splitlines()
                     if line.startswith(f"[127.0.0.1]:{h.ssh_port} "))
    known = tmp_path / "known_hosts"
    known.write_text(Path(h.known_hosts).read_text() + f"{h.internal_address} {port_line.split(' ', 1)[1]}\n")
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("keyed-web", 8152)
    repo.commit("one service")
    async with running_daemon(settings_for(tmp_path, sandbox, repo, known_hosts=known)) as d:
        await d.reconcile()
        sbx1 = d.engine.desired.hosts["sbx-1"]
        add_host(repo, "sbx-1c", address=h.internal_address, ssh_port=22, user=h.user)
        repo.commit("sbx-1 again, by its other address")
        for _ in range(2):
            actions = await d.reconcile()
            assert not [a for a in actions if a.kind is ActionKind.PRUNE], actions
            assert [c["State"] for c in await containers_of(d, sbx1, "keyed-web")] == ["running"]
        assert d.engine.desired.errors == []
        observed = d.engine.observed
        for name, other in (("sbx-1", "sbx-1c"), ("sbx-1c", "sbx-1")):
            facts = observed.hosts[name]
            assert not facts.reachable and facts.error is not None
            assert f"host {name} is the same machine as {other} (same SSH host key SHA256:" in facts.error
        keyed = next(a for a in actions if a.service == "keyed-web")
        assert keyed.kind is ActionKind.BLOCKED and "same machine as sbx-1c" in keyed.reasons[0], keyed
        assert "keyed-web v1" in (await http_get(f"http://{h.internal_address}:8152/")).text
