"""Observation: hosts.yaml entries whose servers show one SSH host key are one machine: none is trusted."""

from deployerd.observe import same_machine
from deployerd.observed import HostFacts, Instance, RunState


def facts(name: str, key: str, reachable: bool = True) -> HostFacts:
    inst = Instance(service="web", host=name, method="docker", release="r1", state=RunState.RUNNING)
    return HostFacts(host=name, reachable=reachable, host_key=key, instances=[inst] if reachable else [])


def test_one_key_under_two_names_makes_both_unknown() -> None:
    out = same_machine({"a": facts("a", "SHA256:k1"), "b": facts("b", "SHA256:k1"), "c": facts("c", "SHA256:k2")})
    assert out["c"].reachable and out["c"].instances
    for name, other in (("a", "b"), ("b", "a")):
        assert not out[name].reachable and out[name].instances == []
        assert out[name].error == (f"host {name} is the same machine as {other} (same SSH host key SHA256:k1); "
                                   "keep one entry per machine in hosts.yaml")


def test_unreachable_or_keyless_hosts_are_not_compared() -> None:
    given = {"a": facts("a", "SHA256:k1"), "b": facts("b", "SHA256:k1", reachable=False), "c": facts("c", "")}
    assert same_machine(given) == given
