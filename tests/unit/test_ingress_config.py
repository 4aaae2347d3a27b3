"""The ingress proxy's pure layer as data: config text, parsed runtime answers, commands, private ports."""

from __future__ import annotations

import pytest

from deployerd.ingress.config import (
    PRIVATE_PORTS,
    Route,
    allocate_port,
    frontends_open,
    parse_in_flight,
    parse_servers_state,
    proxy_id,
    remove_command,
    render_config,
    runtime_errors,
    switch_command,
)
from deployerd.ingress.proxy import parse_config

HEADER = ("# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight "
          "srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state "
          "srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port "
          "srv_check_addr srv_agent_addr srv_agent_port")
SERVERS_STATE = "1\n" + HEADER + """
3 be_web 1 r1 127.0.0.1 2 8 1 1 0 1 0 2 0 0 0 0 - 20001 - 0 0 - - 0
3 be_web 2 r2 127.0.0.1 2 0 1 1 0 1 0 0 0 0 0 0 - 20002 - 0 0 - - 0
5 be_api 1 a1 127.0.0.1 2 1 1 1 0 1 0 0 0 0 0 0 - 20010 - 0 0 - - 0
"""

STAT = """# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight
fe_web,FRONTEND,,,0,1,9985,2,164,398,0,0,0,,,,,OPEN,
fe_api,FRONTEND,,,0,1,9985,2,164,398,0,0,0,,,,,STOP,
be_web,r1,0,0,2,1,,1,82,181,,0,,0,0,0,0,DRAIN,1
be_web,r2,0,0,0,1,,1,82,181,,0,,0,0,0,0,UP,1
be_web,BACKEND,0,0,2,1,999,2,164,398,0,0,,1,0,3,0,UP,1
"""


def test_config_has_a_frontend_and_the_active_server_per_route() -> None:
    text = render_config([Route("web", 8010, "r2", 20002), Route("api", 8011)], drain_timeout_s=10)
    assert "frontend fe_web\n    bind :8010\n    default_backend be_web\n" in text
    assert "    server r2 127.0.0.1:20002\n" in text
    assert "backend be_api\n" in text and "server" not in text.split("backend be_api")[1]
    assert "hard-stop-after 40s" in text
    assert "\n    nbthread 1\n" in text  # one event loop (bench/ingress_latency.py)
    assert text.index("fe_api") < text.index("fe_web")  # sorted: the same routes give the same bytes


def test_config_parses_back_to_its_routes() -> None:
    routes = [Route("api", 8011), Route("web", 8010, "r2", 20002)]
    assert sorted(parse_config(render_config(routes)), key=lambda r: r.service) == routes


def test_a_name_haproxy_cannot_take_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot name"):
        render_config([Route("bad name", 80)])
    assert proxy_id("a1b2c3d4e5f6") == "a1b2c3d4e5f6"


def test_servers_state_is_parsed_with_who_takes_new_requests() -> None:
    state = parse_servers_state(SERVERS_STATE)
    assert [(s.name, s.port, s.active) for s in state.servers["web"]] == [("r1", 20001, False), ("r2", 20002, True)]
    assert state.active("web") is not None and state.active("web").name == "r2"  # type: ignore[union-attr]
    assert state.active("api") is None  # in maintenance
    assert state.active("gone") is None


def test_stat_gives_in_flight_requests_and_bound_frontends() -> None:
    assert parse_in_flight(STAT, "web", "r1") == 2
    assert parse_in_flight(STAT, "web", "r2") == 0
    assert parse_in_flight(STAT, "web", "r9") is None
    assert frontends_open(STAT) == {"web"}


def test_switch_is_one_line_adding_enabling_then_draining() -> None:
    assert switch_command("web", "r3", 20003, ["r1", "r2", "r3"]) == (
        "add server be_web/r3 127.0.0.1:20003; enable server be_web/r3; "
        "set server be_web/r1 state drain; set server be_web/r2 state drain")
    assert remove_command("web", "r1").endswith("del server be_web/r1")


def test_runtime_answers_ok_or_errors() -> None:
    assert runtime_errors("New server registered.\n\n\n") == []
    assert runtime_errors("\nServer deleted.\n") == []
    assert runtime_errors("No such backend.\n") == ["No such backend."]


def test_private_ports_skip_used_ones_and_stay_in_range() -> None:
    first = allocate_port(set(), "web")
    assert first in PRIVATE_PORTS
    assert allocate_port({first}, "web") != first
    assert allocate_port(set(), "web") == first  # deterministic
    with pytest.raises(ValueError, match="no free private port"):
        allocate_port(set(PRIVATE_PORTS), "web")
