"""Prometheus metrics of the reconcile loop, on a registry of their own (one per daemon, so tests can run several).

The metrics are the event bus's first subscriber (``subscribe``): what the engine, the phase runner and
observation publish is counted here, and nowhere else calls a counter. Per-service info and each host's
connection counters are read when scraped.

Duration buckets reach 15 minutes and beyond: Argo CD's and Flux's top buckets (16 s, 10 s) say nothing
about image builds over SSH. No ``_created`` series: they double the output and ``promtool check metrics``
flags them; the alert rules and the dashboard in monitoring/ name only what is exported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from deployerd import events

disable_created_metrics()  # type: ignore[no-untyped-call]

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1800, float("inf"))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.reconciles = Counter(
            "deployerd_reconcile_total", "Reconciles by result (ok, error)", ["result"], registry=r
        )
        self.reconcile_duration = Histogram(
            "deployerd_reconcile_duration_seconds", "Duration of one reconcile (plan and launch)", buckets=BUCKETS,
            registry=r,
        )
        self.jobs = Counter("deployerd_jobs_total", "Jobs by kind and final status", ["kind", "status"], registry=r)
        self.phase_duration = Histogram(
            "deployerd_phase_duration_seconds", "Duration of each deploy phase", ["phase", "method"],
            buckets=BUCKETS, registry=r,
        )
        self.switch_duration = Histogram(
            "deployerd_ingress_switch_seconds", "Ingress proxy switches to a new release (one runtime API change)",
            ["host"], buckets=BUCKETS, registry=r,
        )
        self.drain_duration = Histogram(
            "deployerd_ingress_drain_seconds", "Waits for the old release's requests in flight after a switch",
            ["host"], buckets=BUCKETS, registry=r,
        )
        self.rollbacks = Counter(
            "deployerd_rollbacks_total",
            "Automatic rollbacks by service, failed phase and result (restored: the last good release serves again)",
            ["service", "reason", "result"], registry=r,
        )
        self._service_info = _ServiceInfo(lambda: ())
        r.register(self._service_info)
        self.quarantines = Counter(
            "deployerd_quarantines_total", "Releases quarantined after a failed deploy, by service", ["service"],
            registry=r,
        )
        self.last_applied_commit = Gauge(
            "deployerd_last_applied_commit_timestamp_seconds", "Commit time of the last revision reconciled",
            registry=r,
        )
        self.fetch_errors = Counter("deployerd_git_fetch_errors_total", "Failed git fetches", registry=r)
        self.host_locks = Counter(
            "deployerd_host_locks_total", "Host lock events (acquired, waited, taken_over, busy, lost)", ["event"],
            registry=r,
        )
        self.host_up = Gauge("deployerd_host_up", "1 when the host answered the last observation", ["host"],
                             registry=r)
        self.job_duration = Histogram(
            "deployerd_job_duration_seconds", "Duration of each job (a deploy: its six phases) by kind and status",
            ["kind", "status"], buckets=BUCKETS, registry=r,
        )
        self.last_reconcile_ok = Gauge(
            "deployerd_reconcile_last_success_timestamp_seconds",
            "When a reconcile last succeeded (the daemon's start until the first one)", registry=r,
        )
        self.last_reconcile_ok.set(time.time())
        self.reconcile_interval = Gauge(
            "deployerd_reconcile_interval_seconds", "The configured full reconcile (resync) interval", registry=r,
        )
        self.notifications = Counter(
            "deployerd_notifications_total", "Notifications by destination and result (sent, failed, dropped)",
            ["destination", "kind", "result"], registry=r,
        )

    def watch_hosts(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        """Export each host's connection counters (``HostStats``), read when scraped: a benchmark counts the
        round trips of a reconcile from outside the process."""
        self.registry.register(_HostOperations(stats))

    def watch_services(self, rows: Callable[[], Iterable[Mapping[str, str]]]) -> None:
        """Export one ``deployerd_service_info`` series per row (labels: SERVICE_LABELS), read when scraped: a
        service that left git leaves with its row, and a reconcile builds no series (rebuilding 500 series
        at every reconcile was ~5% of the daemon's CPU at 500)."""
        self._service_info.rows = rows

    def lock_event(self, event: str) -> None:
        """A host lock event (``HostLocks.on_event``)."""
        self.host_locks.labels(event=event).inc()

    def subscribe(self, bus: events.EventBus) -> Callable[[], None]:
        """Count what ``bus`` carries; returns the function that unsubscribes."""
        return bus.subscribe(self.on_event)

    def on_event(self, event: events.Event) -> None:
        """One event into its metrics (every kind of events.py is handled here)."""
        match event:
            case events.ReconcileDone():
                self.reconciles.labels(result="error" if event.error else "ok").inc()
                self.reconcile_duration.observe(event.duration_s)
                if event.error is None:
                    self.last_reconcile_ok.set_to_current_time()
                if event.fetch_error is not None:
                    self.fetch_errors.inc()
                if event.commit_time is not None:
                    self.last_applied_commit.set(event.commit_time)
            case events.HostUp():
                self.host_up.labels(host=event.host).set(1)
            case events.HostDown():
                self.host_up.labels(host=event.host).set(0)
            case events.JobEnded():
                job = event.job
                self.jobs.labels(kind=job.kind, status=job.status.value).inc()
                if job.duration_seconds is not None:
                    self.job_duration.labels(kind=job.kind, status=job.status.value).observe(job.duration_seconds)
            case events.PhaseChanged():
                # a rollback pass re-runs phases for the old release: timing them here would skew the deploys'
                if event.duration_s is not None and not event.rollback:
                    self.phase_duration.labels(phase=event.phase, method=event.job.method).observe(event.duration_s)
            case events.RolledBack():
                result = "restored" if event.ok else "failed"
                self.rollbacks.labels(service=event.service, reason=event.phase, result=result).inc()
            case events.Switched():
                self.switch_duration.labels(host=event.host).observe(event.switch_s)
                self.drain_duration.labels(host=event.host).observe(event.drain_s)
            case events.Quarantined():
                self.quarantines.labels(service=event.service).inc()
            case events.JobStarted():
                pass  # jobs in flight are /health's; a job is counted when it ends, with its outcome

    def render(self) -> bytes:
        return generate_latest(self.registry)


SERVICE_LABELS = ("service", "host", "method", "sync_status", "health_status", "release", "commit")


class _ServiceInfo:
    def __init__(self, rows: Callable[[], Iterable[Mapping[str, str]]]) -> None:
        self.rows = rows

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily("deployerd_service_info", "One series per service: sync and health status, "
                                 "release, commit", labels=list(SERVICE_LABELS))

    @staticmethod
    def _checked() -> GaugeMetricFamily:
        return GaugeMetricFamily("deployerd_service_health_checked_timestamp_seconds",
                                 "When each service's health probe last ran against its running release",
                                 labels=["service"])

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()
        yield self._checked()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family, checked = self._family(), self._checked()
        for row in self.rows():
            family.add_metric([str(row[k]) for k in SERVICE_LABELS], 1)
            if row.get("health_checked_at"):
                checked.add_metric([str(row["service"])], float(row["health_checked_at"]))
        yield family
        yield checked


class _HostOperations:
    KINDS = (("command", "commands"), ("sftp", "sftp_ops"), ("docker_api", "api_requests"), ("connect", "connects"))

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily("deployerd_host_operations", "Operations on each host's SSH connection by kind "
                                   "(command, sftp, docker_api: a round trip each; connect)", labels=["host", "kind"])

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self._family()
        for host, s in sorted(self._stats().items()):
            for kind, attr in self.KINDS:
                family.add_metric([host, kind], getattr(s, attr))
        yield family
