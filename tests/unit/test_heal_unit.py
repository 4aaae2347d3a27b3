"""The heal scheduler and flap guard (pure logic behind a fake check), and the event parsers."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployerd import heal
from deployerd.heal import Healer
from deployerd.runtimes.base import Drift
from deployerd.runtimes.docker_watch import drift_of
from deployerd.runtimes.systemd_watch import bus_label


class FakeCheck:
    """Records each look; heals what ``heals`` says (a set of services), after ``gate`` opens."""

    def __init__(self, heals: bool = True) -> None:
        self.calls: list[tuple[str, set[str] | None, list[str]]] = []
        self.heals = heals
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, host: str, services: set[str] | None, reasons: list[str]) -> set[str]:
        self.calls.append((host, services, reasons))
        await self.gate.wait()
        return set(services or ()) if self.heals else set()


async def settle(h: Healer) -> None:
    for _ in range(100):
        if not h._looking:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("looks did not end")


async def test_an_event_is_one_look_at_that_service() -> None:
    check = FakeCheck()
    h = Healer(check, busy=lambda s: False)
    h.drift("h1", Drift("web", "docker: container x died"))
    await settle(h)
    assert check.calls == [("h1", {"web"}, ["docker: container x died"])]
    assert h.heals == 1 and h.note("web") is None  # one heal is not flapping


async def test_events_of_a_service_with_a_job_in_flight_are_not_looked_at() -> None:
    check = FakeCheck()
    h = Healer(check, busy=lambda s: s == "web")
    h.drift("h1", Drift("web", "stopped by its own deploy"))
    await settle(h)
    assert check.calls == [] and h.recent[-1][3] == "ignored: a job of ours is in flight"


async def test_a_burst_while_looking_is_one_more_look() -> None:
    check = FakeCheck(heals=False)
    check.gate.clear()
    h = Healer(check, busy=lambda s: False)
    for what in ("kill", "die", "destroy"):
        h.drift("h1", Drift("web", what))
    await asyncio.sleep(0.01)
    check.gate.set()
    await settle(h)
    assert [c[2] for c in check.calls] == [["kill"], ["die", "destroy"]]
    assert h.heals == 0 and "web" not in h.flaps  # nothing healed: nothing counted


async def test_a_watch_that_starts_looks_at_every_service_of_its_host() -> None:
    check = FakeCheck(heals=False)
    h = Healer(check, busy=lambda s: False)
    h.drift("h1", Drift(None, "docker on h1: watching"))
    await settle(h)
    assert check.calls == [("h1", None, ["docker on h1: watching"])]


async def test_flap_guard_backs_off_from_the_third_heal_in_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heal, "FLAP_MIN_S", 0.05)
    monkeypatch.setattr(heal, "FLAP_MAX_S", 0.2)
    check = FakeCheck()
    notes: dict[str, str | None] = {}
    h = Healer(check, busy=lambda s: False, on_note=lambda s, n: notes.__setitem__(s, n))
    for i in range(4):
        h.drift("h1", Drift("web", f"died {i}"))
        await settle(h)
    reasons = [c[2] for c in check.calls]
    assert [any(r.startswith("flap guard: waited") for r in rs) for rs in reasons] == [False, False, True, True]
    flap = h.flaps["web"]
    assert flap.heals == 4 and flap.backoff.failures == 3
    assert h.holding("web") and (notes["web"] or "").startswith("flapping: healed 4 times")


async def test_a_service_that_stayed_up_is_forgotten() -> None:
    h = Healer(FakeCheck(), busy=lambda s: False)
    for i in range(2):
        h.drift("h1", Drift("web", f"died {i}"))
        await settle(h)
    assert h.holding("web")  # the second heal in a row armed the backoff
    flap = h.flaps["web"]
    flap.last_heal -= heal.STABLE_S + 1
    flap.backoff.until = 0.0
    assert not h.holding("web") and "web" not in h.flaps


def test_docker_events_name_the_service_release_and_exit_code() -> None:
    line = json.dumps({"Type": "container", "Action": "die", "Actor": {"ID": "abc123", "Attributes": {
        "deployerd.service": "web", "deployerd.release": "r1", "exitCode": "137", "name": "deployerd-web-r1"}}})
    d = drift_of(line.encode())
    assert d == Drift("web", "docker: container deployerd-web-r1 died (exit code 137)", release="r1", ref="abc123")
    assert drift_of(b'{"Action": "die", "Actor": {"Attributes": {}}}') is None  # not ours
    assert drift_of(b"not json") is None and drift_of(b"[1]") is None


def test_bus_label_is_systemds_object_path_escaping() -> None:
    assert bus_label("deployerd-") == "deployerd_2d"
    assert bus_label("deployerd-t1-web.service") == "deployerd_2dt1_2dweb_2eservice"
