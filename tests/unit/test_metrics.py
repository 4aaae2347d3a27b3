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


def test_service_rows_replace_the_series_only_when_they_change() -> None:
    m = Metrics()
    row = {"service": "web", "host": "h", "method": "docker", "sync_status": "Synced", "health_status": "Healthy",
           "release": "r1", "commit": "c"}
    m.set_services([row])
    m.set_services([dict(row)])
    assert m.render().decode().count("deployerd_service_info{") == 1
    m.set_services([{**row, "release": "r2"}])
    text = m.render().decode()
    assert 'release="r2"' in text and 'release="r1"' not in text
    m.set_services([])
    assert "deployerd_service_info{" not in m.render().decode()
