"""Host watchers: one task per reachable host and answering runtime, streaming its own events of our instances.

A Docker engine reports container events through the forwarded socket (``runtimes.docker_watch``), systemd
its unit state changes over the kept SSH connection (``runtimes.systemd_watch``). Each change is handed to
``on_drift`` (the ``heal.Healer``), which looks at that service again; a watcher that starts listening (the
first time, or again after its stream broke) hands over a service-less ``Drift``, so what changed while it was
not listening is looked at too.

Which watchers run follows each reconcile's facts (``sync``): a host that answered, each runtime that answered
there (a host without Docker, or whose services are all systemd ones, is watched for systemd only). A stream
that breaks is opened again with backoff (1 s doubling to 30 s) at most ``WATCH_ATTEMPTS`` times in a row, then
the watcher stops until the next reconcile sees the host (a resync, or the one a host coming back starts);
``HostDown`` stops a host's watchers and ``HostUp`` starts them again at once. Everything is a task on the
event loop: nothing here blocks, and a watcher never holds more than its stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping

from deployerd import events
from deployerd.backoff import Backoff
from deployerd.desired import HostSpec
from deployerd.observe import Hosts
from deployerd.runtimes.base import Drift

log = logging.getLogger(__name__)

WATCH_RETRY_MIN_S, WATCH_RETRY_MAX_S = 1.0, 30.0
WATCH_ATTEMPTS = 5  # failed (re)connects in a row before a watcher waits for the next reconcile

Key = tuple[str, str]  # (host, runtime)


class HostWatchers:
    def __init__(self, hosts: Hosts, on_drift: Callable[[str, Drift], None], bus: events.EventBus) -> None:
        self.hosts = hosts
        self.on_drift = on_drift
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self._specs: dict[Key, HostSpec] = {}
        self.listening: set[Key] = set()  # watchers whose stream is open now (read by /health and tests)
        self.opened: dict[Key, int] = {}  # how many times each watcher's stream began listening
        self._closed = False
        self._unsubscribe = bus.subscribe(self._on_event)

    def sync(self, wanted: Mapping[str, tuple[HostSpec, Collection[str]]]) -> None:
        """Watch exactly ``wanted`` (host -> its spec and the runtimes that answered there); a watcher that gave up
        or whose host's spec changed is started again."""
        if self._closed:
            return
        keys = {(h, m): spec for h, (spec, methods) in wanted.items() for m in methods}
        for key in list(self._tasks):
            if key not in keys or keys[key] != self._specs.get(key):
                self._stop(key)
        for key, spec in keys.items():
            task = self._tasks.get(key)
            if task is None or task.done():
                self._start(key, spec)

    async def close(self) -> None:
        self._closed = True
        self._unsubscribe()
        tasks = list(self._tasks.values())
        for key in list(self._tasks):
            self._stop(key)
        await asyncio.gather(*tasks, return_exceptions=True)

    def _on_event(self, event: events.Event) -> None:
        if isinstance(event, events.HostDown):
            for key in [k for k in self._tasks if k[0] == event.host]:
                self._tasks[key].cancel()  # its spec is kept: HostUp starts it again
        elif isinstance(event, events.HostUp) and not self._closed:
            for key, spec in list(self._specs.items()):
                task = self._tasks.get(key)
                if key[0] == event.host and (task is None or task.done()):
                    self._start(key, spec)

    def _start(self, key: Key, spec: HostSpec) -> None:
        self._specs[key] = spec
        self._tasks[key] = asyncio.create_task(self._watch(key, spec), name=f"watch {key[1]} {key[0]}")

    def _stop(self, key: Key) -> None:
        task = self._tasks.pop(key, None)
        self._specs.pop(key, None)
        if task is not None:
            task.cancel()

    async def _watch(self, key: Key, spec: HostSpec) -> None:
        host, method = key
        backoff = Backoff(WATCH_RETRY_MIN_S, WATCH_RETRY_MAX_S)
        why = ""
        while backoff.failures < WATCH_ATTEMPTS:
            opened = time.monotonic()
            try:
                handle = await self.hosts.handle(spec)
                async for drift in handle.runtimes[method].watch():
                    if drift.service is None:
                        self.listening.add(key)
                        self.opened[key] = self.opened.get(key, 0) + 1
                        log.info("%s", drift.what)
                    self.on_drift(host, drift)
                why = "its stream ended"
            except asyncio.CancelledError:
                self.listening.discard(key)
                raise
            except Exception as e:  # the host, its engine or the helper went away: open it again, bounded
                why = f"{type(e).__name__}: {e}"
            self.listening.discard(key)
            if time.monotonic() - opened > WATCH_RETRY_MAX_S:
                backoff = Backoff(WATCH_RETRY_MIN_S, WATCH_RETRY_MAX_S)  # it had run a while: a fresh break
            wait = backoff.fail()
            log.info("host %s: %s watch lost (%s); again in %.0f s", host, method, why, wait)
            await asyncio.sleep(wait)
        log.warning("host %s: %s events not watched after %d attempts (%s); drift there is healed by the resync "
                    "until the next reconcile starts the watch again", host, method, WATCH_ATTEMPTS, why)
