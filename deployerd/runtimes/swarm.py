"""Docker Swarm through its manager: build once there, push to the cluster's registry, let Swarm schedule.

The runtime runs on the cluster's manager host (hosts.yaml ``clusters``), over that host's one SSH
connection and its forwarded engine socket, so transfer, build, locks and health use the same seams as
``method: docker``. deployerd does not place containers here; it sets a service spec and judges the result
honestly: Start succeeds only when Swarm's UpdateStatus says completed (not merely "the API accepted it",
nor a rollback Swarm did by itself) and every task meant to run runs the new image; Verify Health then
probes each task's node on its published port.

Observation is one round per cluster (services, then running tasks), whatever the number of services.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from aiodocker.exceptions import DockerError

from deployerd.connection import CommandError, HostUnreachable
from deployerd.observed import Instance, RunState
from deployerd.runtimes.base import ReleaseContext, StartError
from deployerd.runtimes.docker import DockerRuntime, _tail
from deployerd.runtimes.swarm_spec import (
    IMAGE_RELEASE_LABEL,
    IMAGE_SERVICE_LABEL,
    INSTANCE_LABEL,
    RELEASE_LABEL,
    ROLLED_BACK,
    SERVICE_LABEL,
    converged,
    drift,
    image_labels,
    image_ref,
    instance_of,
    kept_releases,
    service_spec,
    task_summary,
    update_started,
)

POLL_S = 0.5
# Words of `docker push` errors that mean the registry could not be reached (an outage: retried), as
# opposed to a refusal (terminal).
_UNREACHABLE = ("connection refused", "no such host", "i/o timeout", "dial tcp", "connection reset",
                "no route to host", "503 service unavailable", "502 bad gateway", "eof")


class ImageRegistryUnreachable(HostUnreachable):
    """The cluster's image registry did not answer a push: an outage, so the job is retried, never rolled back."""


class SwarmRuntime(DockerRuntime):
    method = "swarm"

    def image(self, ctx: ReleaseContext) -> str:
        if ctx.host.manages is None:
            raise StartError(f"host {ctx.host.name} manages no cluster (hosts.yaml clusters)")
        return image_ref(ctx.host.manages.registry, ctx.qualified_name, ctx.release)

    def build_labels(self, ctx: ReleaseContext) -> dict[str, str]:
        return image_labels(ctx)

    # -- reads

    async def _services(self, service: str | None = None) -> list[Mapping[str, Any]]:
        d = await self._docker()
        label = SERVICE_LABEL if service is None else f"{SERVICE_LABEL}={service}"
        return list(await d.services.list(filters={"label": [f"{INSTANCE_LABEL}={self.instance}", label]}))

    async def _inspect(self, service: str) -> Mapping[str, Any] | None:
        found = await self._services(service)
        return found[0] if found else None

    async def _tasks(self, service_name: str | None = None) -> list[Mapping[str, Any]]:
        d = await self._docker()
        filters: dict[str, Any] = {"desired-state": "running"}
        if service_name is not None:
            filters["service"] = service_name
        return list(await d.tasks.list(filters=filters))

    async def observe(self) -> tuple[list[Instance], dict[str, list[str]]]:
        if self.host.manages is None:
            return [], {}  # not a manager: nothing to ask (and no Swarm API to ask it of)
        services = await self._services()
        if not services:
            return [], {}
        tasks = await self._tasks()
        running = Counter(t.get("ServiceID") for t in tasks if (t.get("Status") or {}).get("State") == "running")
        instances = [instance_of(s, running[s.get("ID")], self.host.name) for s in services]
        kept = {i.service: kept_releases(s) for i, s in zip(instances, services, strict=True)}
        return instances, kept

    async def state(self, service: str, release: str) -> RunState | None:
        found = await self._inspect(service)
        if found is None:
            return None
        if ((found.get("Spec") or {}).get("Labels") or {}).get(RELEASE_LABEL) != release:
            # Swarm rolled back away from it (during Verify Health: its monitor saw a task fail)
            return RunState.FAILED if (found.get("UpdateStatus") or {}).get("State") in ROLLED_BACK else None
        if (found.get("UpdateStatus") or {}).get("State") in ("paused", "rollback_paused"):
            return RunState.FAILED
        return RunState.RUNNING

    async def health_targets(self, service: str, release: str) -> list[tuple[str, str]]:
        """(address, node) of every node a task of ``service`` is meant to run on: its published port there."""
        d = await self._docker()
        tasks, nodes = await asyncio.gather(self._tasks(self.qualified(service)), d.nodes.list())
        addr = {n["ID"]: ((n.get("Status") or {}).get("Addr", ""), (n.get("Description") or {}).get("Hostname", ""))
                for n in nodes}
        return sorted({addr[t["NodeID"]] for t in tasks if t.get("NodeID") in addr and addr[t["NodeID"]][0]})

    async def logs(self, service: str, release: str, lines: int = 40) -> list[str]:
        done = await self.conn.run(["docker", "service", "logs", "--raw", "--tail", str(lines), "--",
                                    self.qualified(service)], check=False, timeout=30)
        return _tail(done.stdout + done.stderr, lines)

    # -- changes

    async def _push(self, image: str) -> None:
        try:
            await self.conn.run(["docker", "push", "--quiet", image], timeout=15 * 60)
        except CommandError as e:
            text = e.stderr.lower()
            if any(word in text for word in _UNREACHABLE):
                registry = image.split("/", 1)[0]
                raise ImageRegistryUnreachable(registry, f"image registry not answering: {_tail(e.stderr, 1)}") from e
            raise StartError(f"docker push {image} failed on {self.host.name}", _tail(e.stderr)) from e

    async def start(self, ctx: ReleaseContext) -> dict[str, Any]:
        d = await self._docker()
        image = self.image(ctx)
        t0 = time.monotonic()
        await self._push(image)
        spec = service_spec(ctx, image)
        current = await self._inspect(ctx.spec.name)
        before = update_started(current)
        action = "created"
        try:
            if current is None:
                await d._query_json("services/create", method="POST", data=json.dumps(spec))
            elif (current.get("Spec") or {}).get("Labels") == spec["Labels"] and drift(current) is None:
                action = "unchanged"  # e.g. the spec Swarm itself rolled back to is the one wanted
            else:
                action = "updated"
                await d._query_json(f"services/{current['ID']}/update", method="POST", data=json.dumps(spec),
                                    params={"version": str(current["Version"]["Index"])})
        except DockerError as e:
            raise StartError(f"Swarm refused service {ctx.qualified_name} on {self.host.name}: {e.message}") from e
        pushed = round(time.monotonic() - t0, 3)
        update = await self._converge(ctx, image, before, action != "unchanged")
        return {"service": ctx.qualified_name, "image": image, "cluster": ctx.host.manages.name if ctx.host.manages
                else None, "action": action, "push_seconds": pushed, **update}

    def _converge_timeout(self, ctx: ReleaseContext) -> float:
        r = ctx.spec.rollout
        per_task = r.monitor_s + r.delay_s + 30.0
        return 60.0 + per_task * max(1, ctx.spec.swarm_replicas or 3)

    async def _converge(self, ctx: ReleaseContext, image: str, before: str | None, updated: bool) -> dict[str, Any]:
        """Wait until the update is completed and every task runs ``image``; raise on Swarm's rollback/pause."""
        t0 = time.monotonic()
        deadline = t0 + self._converge_timeout(ctx)
        polls = 0
        while True:
            polls += 1
            current = await self._inspect(ctx.spec.name)
            if current is None:
                raise StartError(f"service {ctx.qualified_name} vanished while it was being updated")
            tasks = await self._tasks(ctx.qualified_name)
            done, failure = converged(current, tasks, image, ctx.release.id, before, updated)
            if failure is not None:
                raise StartError(failure, await self.logs(ctx.spec.name, ctx.release.id))
            if done:
                state = (current.get("UpdateStatus") or {}).get("State") if update_started(current) != before else None
                return {"update_state": state or "no rolling update needed", "tasks": len(tasks),
                        "converge_seconds": round(time.monotonic() - t0, 3), "polls": polls}
            if time.monotonic() > deadline:
                raise StartError(f"service {ctx.qualified_name} did not converge within "
                                 f"{self._converge_timeout(ctx):.0f} s: {task_summary(tasks)}",
                                 await self.logs(ctx.spec.name, ctx.release.id))
            await asyncio.sleep(POLL_S)

    async def discard(self, service: str, release: str) -> None:
        """A failed first release (no spec to go back to) is removed; otherwise deployerd's rollback sets the
        last good spec again (Start of that release), so nothing is removed here."""
        found = await self._inspect(service)
        if found is None:
            return
        labels = (found.get("Spec") or {}).get("Labels") or {}
        if labels.get(RELEASE_LABEL) == release and not found.get("PreviousSpec"):
            await self._delete(found["ID"])

    async def _delete(self, service_id: str) -> None:
        d = await self._docker()
        try:
            await d.services.delete(service_id)
        except DockerError as e:
            if e.status != 404:
                raise

    async def remove_service(self, service: str) -> dict[str, Any]:
        releases: set[str] = set()
        for found in await self._services(service):
            releases.update(kept_releases(found))
            await self._delete(found["ID"])
        await self._wait_tasks_gone(self.qualified(service))
        removed = await self.retain(service, keep=[])
        await self.conn.run(["rm", "-rf", "--", self.service_dir(service)])
        return {"removed_releases": sorted(releases | set(removed["removed_releases"]))}

    async def _wait_tasks_gone(self, name: str, limit_s: float = 60.0) -> None:
        """Bounded wait until the manager runs no task container of a removed service (they hold its image)."""
        d = await self._docker()
        filters = json.dumps({"label": [f"com.docker.swarm.service.name={name}"]})
        deadline = time.monotonic() + limit_s
        while await d.containers.list(all=True, filters=filters) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)

    async def retain(self, service: str, keep: list[str]) -> dict[str, Any]:
        """Local images on the manager of releases not kept (nor in use by the service's spec or previous
        spec), and their files. Images in the cluster's registry are left to its garbage collection."""
        d = await self._docker()
        in_use: set[str] = set()
        for found in await self._services(service):
            for key in ("Spec", "PreviousSpec"):
                image = ((found.get(key) or {}).get("TaskTemplate") or {}).get("ContainerSpec", {}).get("Image")
                if image:
                    in_use.add(image)
        images = await d.images.list(filters={"label": [f"{IMAGE_SERVICE_LABEL}={self.qualified(service)}"]})
        removed: set[str] = set()
        for img in images:
            release = (img.get("Labels") or {}).get(IMAGE_RELEASE_LABEL, "")
            if release in keep or set(img.get("RepoTags") or []) & in_use:
                continue
            try:
                await d.images.delete(img["Id"], force=True)
            except DockerError as e:
                if e.status == 409:  # a task container still stopping holds it: the next retention takes it
                    continue
                if e.status != 404:
                    raise
            removed.add(release)
        return await self.finish_retention(service, keep, removed)
