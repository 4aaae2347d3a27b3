"""Metrics: each host's connection counters are exported as they are when scraped."""

from __future__ import annotations

from deployerd.connection import HostStats
from deployerd.metrics import Metrics


def test_host_operations_are_read_at_scrape_time() -> None:
    stats = {"web-1": HostStats(connects=1, commands=3, sftp_ops=2, api_requests=5)}
    m = Metrics()
    m.watch_hosts(lambda: stats)
    text = m.render().decode()
    assert 'deployerd_host_operations_total{host="web-1",kind="command"} 3.0' in text
    assert 'deployerd_host_operations_total{host="web-1",kind="sftp"} 2.0' in text
    assert 'deployerd_host_operations_total{host="web-1",kind="docker_api"} 5.0' in text
    assert 'deployerd_host_operations_total{host="web-1",kind="connect"} 1.0' in text
    stats["web-1"].commands += 1
    stats["db-1"] = HostStats()
    text = m.render().decode()
    assert 'deployerd_host_operations_total{host="web-1",kind="command"} 4.0' in text
    assert 'deployerd_host_operations_total{host="db-1",kind="command"} 0.0' in text
    assert stats["web-1"].round_trips == 4 + 2 + 5
