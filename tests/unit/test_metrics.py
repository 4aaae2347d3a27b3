"""Metrics: each host's connection counters are exported as they are when scraped."""

from __future__ import annotations

from deployerd import events
from deployerd.connection import HostStats
from deployerd.events import EventBus
from deployerd.metrics import Metrics
from deployerd.store import Job, JobStatus


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


def test_service_rows_are_read_at_scrape_time() -> None:
    rows: list[dict[str, str]] = []
    m = Metrics()
    m.watch_services(lambda: rows)
    assert "deployerd_service_info{" not in m.render().decode()
    row = {"service": "web", "host": "h", "method": "docker", "sync_status": "Synced", "health_status": "Healthy",
           "release": "r1", "commit": "c"}
    rows.append(row)
    assert m.render().decode().count("deployerd_service_info{") == 1
    rows[0] = {**row, "release": "r2"}
    text = m.render().decode()
    assert 'release="r2"' in text and 'release="r1"' not in text
    rows.clear()
    assert "deployerd_service_info{" not in m.render().decode()


def _sample(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_every_event_kind_is_counted_by_the_subscriber() -> None:
    bus, m = EventBus(), Metrics()
    unsubscribe = m.subscribe(bus)
    job = Job(service="web", host="h", method="systemd", kind="deploy", status=JobStatus.FAILED, duration_seconds=3.0)
    m.last_reconcile_ok.set(0)
    bus.publish(events.ReconcileDone(revision="abc", trigger=("poll",), duration_s=0.5, actions=1,
                                     commit_time=1700000000))
    bus.publish(events.ReconcileDone(revision=None, trigger=(), duration_s=0.25, actions=0, error="boom",
                                     fetch_error="git down"))
    bus.publish(events.HostUp(host="h"))
    bus.publish(events.HostDown(host="g", error="refused"))
    bus.publish(events.JobStarted(job=job))
    bus.publish(events.PhaseChanged(job=job, phase="Build", status="running"))
    bus.publish(events.PhaseChanged(job=job, phase="Build", status="failed", duration_s=2.0))
    bus.publish(events.RolledBack(service="web", host="h", failed_release="r2", restored_release="r1",
                                  phase="Verify Health", ok=True))
    bus.publish(events.PhaseChanged(job=job, phase="Build", status="succeeded", duration_s=9.0, rollback=True))
    bus.publish(events.RolledBack(service="web", host="h", failed_release="r3", restored_release=None,
                                  phase="Build", ok=False))
    bus.publish(events.Quarantined(service="web", release="r2", reason="health"))
    bus.publish(events.JobEnded(job=job))
    assert bus.subscriber_errors == 0
    assert _sample(m, "deployerd_reconcile_total", result="ok") == 1
    assert _sample(m, "deployerd_reconcile_total", result="error") == 1
    assert _sample(m, "deployerd_reconcile_duration_seconds_sum") == 0.75
    assert _sample(m, "deployerd_git_fetch_errors_total") == 1
    assert _sample(m, "deployerd_last_applied_commit_timestamp_seconds") == 1700000000
    assert _sample(m, "deployerd_host_up", host="h") == 1 and _sample(m, "deployerd_host_up", host="g") == 0
    # the rollback pass's Build is not a deploy's Build
    assert _sample(m, "deployerd_phase_duration_seconds_count", phase="Build", method="systemd") == 1
    assert _sample(m, "deployerd_phase_duration_seconds_sum", phase="Build", method="systemd") == 2.0
    assert _sample(m, "deployerd_rollbacks_total", service="web", reason="Verify Health", result="restored") == 1
    assert _sample(m, "deployerd_rollbacks_total", service="web", reason="Build", result="failed") == 1
    assert _sample(m, "deployerd_quarantines_total", service="web") == 1
    assert _sample(m, "deployerd_jobs_total", kind="deploy", status="failed") == 1
    assert _sample(m, "deployerd_job_duration_seconds_sum", kind="deploy", status="failed") == 3.0
    assert (_sample(m, "deployerd_reconcile_last_success_timestamp_seconds") or 0) > 0
    unsubscribe()
    bus.publish(events.HostDown(host="h", error="gone"))
    assert _sample(m, "deployerd_host_up", host="h") == 1
