"""A Docker engine's own container events on a host, streamed through the SSH-forwarded engine socket.

A long-lived ``GET /events``, filtered by the engine itself (containers with our instance label; the events that
say one stopped serving: die, stop, destroy, oom), on an HTTP session of its own: a stream must not hold a
connection of the session the runtime's API calls share. The response's headers come once the engine has
registered the subscription, so from the first (service-less) ``Drift`` on, nothing is missed. An event only
says "look at this service again": the planner decides from fresh facts.

Fresh, because of one barrier: the engine publishes ``die`` while it still holds the container's lock and before
it writes the exit to the view its list call reads (a crash is followed by no other event, so a look at once
could still see it running). Inspecting the container takes that lock, so once the inspect answers, the list
shows the exit: each drift is handed on only then. A container the inspect shows ``removing`` (``docker rm -f``
killed it) is looked at on its ``destroy``, which follows: restarting it meanwhile would race its removal.
``kill`` is not asked for: it says a signal was sent, and what that did comes as ``die``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp

from deployerd.connection import Connection
from deployerd.runtimes.base import LABEL_PREFIX, Drift

SERVICE_LABEL = f"{LABEL_PREFIX}service"
DRIFT_EVENTS = ("die", "stop", "destroy", "oom")
_VERBS = {"die": "died", "stop": "was stopped", "destroy": "was removed",
          "oom": "ran out of memory"}


class EventsRefused(Exception):
    """The engine answered the events request with an error."""


async def container_events(conn: Connection, host: str, instance_label: str) -> AsyncIterator[Drift]:
    """``Drift`` per container event of ours on ``host``; a service-less one first, once subscribed. Ends (or
    raises) when the stream breaks."""
    sock = await conn.docker_socket()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=30)
    filters = {"type": ["container"], "event": list(DRIFT_EVENTS), "label": [instance_label]}
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(sock), timeout=timeout) as session, \
            session.get("http://localhost/events", params={"filters": json.dumps(filters)}) as resp:
        conn.stats.api_requests += 1
        if resp.status != 200:
            raise EventsRefused(f"host {host}: docker events answered {resp.status}: {(await resp.text())[:200]}")
        yield Drift(None, f"docker on {host}: watching container events")
        async for line in resp.content:
            drift = drift_of(line)
            if drift is None:
                continue
            if drift.ref:  # a barrier, not a wait: see above (a destroyed one answers 404 at once)
                conn.stats.api_requests += 1
                async with session.get(f"http://localhost/containers/{drift.ref}/json") as inspected:
                    info = await inspected.json(content_type=None) if inspected.status == 200 else {}
                if ((info or {}).get("State") or {}).get("Status") == "removing":
                    continue  # its destroy comes next
            yield drift


def drift_of(line: bytes) -> Drift | None:
    """One line of the engine's event stream -> a ``Drift`` of the service its labels name (pure)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    attrs = (event.get("Actor") or {}).get("Attributes") or {}
    service = attrs.get(SERVICE_LABEL)
    if not service:
        return None
    action = str(event.get("Action") or event.get("status") or "")
    code = f" (exit code {attrs['exitCode']})" if action == "die" and attrs.get("exitCode") else ""
    actor = str((event.get("Actor") or {}).get("ID") or event.get("id") or "")
    return Drift(service, f"docker: container {attrs.get('name', '?')} {_VERBS.get(action, action)}{code}",
                 release=attrs.get(f"{LABEL_PREFIX}release", ""), ref=actor if actor.isalnum() else "")
