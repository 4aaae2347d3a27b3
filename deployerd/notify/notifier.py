"""Delivery of notices: one task and one bounded queue per destination, fed from the event stream.

A deploy never waits on a notification: the bus's callback only deduplicates and enqueues; each destination
has its own bounded queue (oldest dropped, counted) and its own task, and a delivery is retried with
exponential backoff a bounded number of times, then given up, logged and counted in ``/metrics``
(``deployerd_notifications_total{destination,result}``: sent, failed, dropped). The URLs and tokens are read
from their files (0600 enforced) at each delivery and never logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

from deployerd.config import CommitStatusDestination, Destination, SlackDestination, WebhookDestination, read_private
from deployerd.events import Event, EventBus
from deployerd.metrics import Metrics
from deployerd.notify.outcomes import Deduper, Notice, notice_of
from deployerd.notify.render import Request, build
from deployerd.worker import Worker

log = logging.getLogger(__name__)

QUEUE_MAX = 100
ATTEMPTS = 4  # one try and three retries: 1, 2, 4 s apart by default
TIMEOUT_S = 10.0


class DeliveryError(Exception):
    """A destination refused or could not be reached; the message never holds its URL or token."""


def _secret(path: Any, what: str) -> str:
    value = read_private(path, what).decode().strip()
    if not value:
        raise DeliveryError(f"{path}: the {what} file is empty")
    return value


def request_for(dest: Destination, notice: Notice) -> Request | None:
    """Read the destination's files and build its request (None: nothing to send there)."""
    if isinstance(dest, WebhookDestination):
        return build(dest, notice, _secret(dest.url_file, "webhook URL"), _secret(dest.secret_file, "webhook secret"))
    if isinstance(dest, SlackDestination):
        return build(dest, notice, _secret(dest.url_file, "Slack webhook URL"))
    assert isinstance(dest, CommitStatusDestination)
    if not notice.commit:
        return None
    return build(dest, notice, secret=_secret(dest.token_file, f"{dest.kind} token"))


class _Channel:
    def __init__(self, dest: Destination, notifier: Notifier) -> None:
        self.dest = dest
        self.dedupe = Deduper(dest.reminder_s)
        self.worker: Worker[Notice] = Worker(f"notify {dest.name}", self._deliver, QUEUE_MAX)
        self._n = notifier

    def offer(self, notice: Notice) -> None:
        admitted = self.dedupe.admit(notice, self._n.clock())
        if admitted is not None and not self.worker.put(admitted, drop_oldest=True):
            self._n.count(self.dest, "dropped")
            log.warning("notifications to %s: queue full, oldest message dropped", self.dest.name)

    async def _deliver(self, notice: Notice) -> None:
        error = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(self._n.backoff_s * 2 ** (attempt - 1))
            try:
                req = await asyncio.to_thread(request_for, self.dest, notice)  # reads the secret files
                if req is None:
                    return
                resp = await self._n.http.request(req.method, req.url, headers=req.headers, content=req.body)
                if resp.status_code < 300:
                    self._n.count(self.dest, "sent")
                    return
                error = f"HTTP {resp.status_code}"
                if resp.status_code in (400, 401, 403, 404, 422):
                    break  # the request or the token is wrong: retrying cannot help
            except (OSError, DeliveryError) as e:  # a file missing or too open: the message names the file
                error = str(e)
                break
            except httpx.HTTPError as e:
                error = type(e).__name__  # httpx's text may quote the URL, which holds a token for Slack
        self._n.count(self.dest, "failed")
        log.warning("notification to %s (%s) about %s %s failed: %s", self.dest.name, self.dest.kind,
                    notice.service, notice.outcome.value, error)


class Notifier:
    """Subscribes to the bus; ``start()`` runs it on tasks of its own, ``close()`` stops them."""

    def __init__(self, destinations: list[Destination], metrics: Metrics, *, backoff_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, http: httpx.AsyncClient | None = None) -> None:
        self.metrics = metrics
        self.backoff_s = backoff_s
        self.clock = clock
        self.http = http or httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False)
        self.channels = [_Channel(d, self) for d in destinations]
        self._unsubscribe: Callable[[], None] = lambda: None
        for d in destinations:  # every series exists from the start: alerts on increase() see the first failure
            for result in ("sent", "failed", "dropped"):
                metrics.notifications.labels(destination=d.name, kind=d.kind, result=result)

    def count(self, dest: Destination, result: str) -> None:
        self.metrics.notifications.labels(destination=dest.name, kind=dest.kind, result=result).inc()

    def start(self, bus: EventBus) -> None:
        """Subscribe (a quick inline callback: dedupe and enqueue) and start one delivery task per destination."""
        if not self.channels:
            return
        self._unsubscribe = bus.subscribe(self.on_event)
        for channel in self.channels:
            channel.worker.start()

    def on_event(self, event: Event) -> None:
        notice = notice_of(event)
        if notice is not None:
            for channel in self.channels:
                channel.offer(notice)

    async def drain(self, limit_s: float = 30.0) -> None:
        """Wait (bounded) until every queue is empty: tests, and the daemon's stop, use it."""
        deadline = time.monotonic() + limit_s
        for channel in self.channels:
            await channel.worker.drain(max(0.0, deadline - time.monotonic()))

    async def close(self) -> None:
        self._unsubscribe()
        for channel in self.channels:
            await channel.worker.close()
        await self.http.aclose()
