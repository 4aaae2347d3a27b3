"""Docker Swarm through its manager: build once there, push to the cluster's registry, let Swarm schedule.

The runtime runs on the cluster's manager host (hosts.yaml ``clusters``), over that host's one SSH connection
and its forwarded engine socket, so Transfer, Build, locks and Verify Health use the same seams as ``method:
docker``. deployerd does not place containers here; it sets a service spec and judges the result honestly:
Start succeeds only when Swarm's UpdateStatus says completed (not merely "the API accepted it", nor a
rollback Swarm did by itself) and every task meant to run runs the new task template; Verify Health then
probes each task's node on its published port. Swarm's own rollback fails the deploy.

Observation is one round of calls per cluster (services, tasks, nodes), whatever the number of services.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

from aiodocker.exceptions import DockerError

from deployerd.connection import CommandError
from deployerd.observed import Instance, RunState
from deployerd.runtimes.base import BuildResult, Output, ReleaseContext, Removed, Runtime, StartError, StartResult
from deployerd.runtimes.docker import EngineAPI, _tail, build_argv
from deployerd.runtimes.swarm_spec import (
    IMAGE_INSTANCE_LABEL,
    IMAGE_RELEASE_LABEL,
    IMAGE_SERVICE_LABEL,
    INSTANCE_LABEL,
    PAUSED,
    RELEASE_LABEL,
    ROLLED_BACK,
    SERVICE_LABEL,
    converged,
    drift,
    image_labels,
    image_ref,
    instance_of,
    kept_releases,
    release_state,
    rolled_back,
    running_nodes,
    service_spec,
    task_summary,
    update_started,
)

POLL_S = 0.5
# Words of `docker push` errors that mean the registry could not be reached (an outage: retried), as opposed
# to a refusal (terminal).
_UNREACHABLE = ("connection refused", "no such host", "i/o timeout", "dial tcp", "connection reset",
                "no route to host", "503 service unavailable", "502 bad gateway", "eof")


class ImageRegistryUnreachable(Exception):
    """The cluster's image registry did not answer a push: an outage, so the job is retried, never rolled back."""

    transient = True


def _node_addresses(nodes: list[Mapping[str, Any]]) -> dict[str, str]:
    """Node id -> its address. A manager listening on 0.0.0.0 reports that as its Status.Addr: its advertised
    manager address says where it is."""
    out: dict[str, str] = {}
    for n in nodes:
        addr = (n.get("Status") or {}).get("Addr", "")
        if addr in ("", "0.0.0.0"):
            addr = ((n.get("ManagerStatus") or {}).get("Addr", "") or "").rpartition(":")[0].strip("[]")
        if addr:
            out[n["ID"]] = addr
    return out


class SwarmRuntime(EngineAPI, Runtime):
    method = "swarm"

    def image(self, ctx: ReleaseContext) -> str:
        if ctx.host.manages is None:
            raise StartError(f"host {ctx.host.name} manages no cluster (hosts.yaml clusters)")
        return image_ref(ctx.host.manages.registry, ctx.qualified_name, ctx.release)

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

    async def _nodes(self) -> dict[str, str]:
        return _node_addresses(list(await (await self._docker()).nodes.list()))

    async def observe(self) -> tuple[list[Instance], dict[str, list[str]]]:
        if self.host.manages is None:
            return [], {}  # not a manager in hosts.yaml: nothing to ask (a worker has no Swarm API to ask it of)
        services = await self._services()
        if not services:
            return [], {}
        tasks, nodes = await asyncio.gather(self._tasks(), self._nodes())
        instances = [instance_of(s, running_nodes(s, tasks, nodes), self.host.name) for s in services]
        return instances, {i.service: kept_releases(s) for i, s in zip(instances, services, strict=True)}

    async def has_instances(self, service: str) -> bool:
        return self.host.manages is not None and bool(await self._services(service))

    async def has_artifact(self, ctx: ReleaseContext) -> bool:
        try:
            await (await self._docker()).images.inspect(self.image(ctx))
            return True
        except DockerError as e:
            if e.status == 404:
                return False
            raise

    async def state(self, ctx: ReleaseContext) -> RunState | None:
        return release_state(await self._inspect(ctx.spec.name), ctx.release.id)

    async def health_targets(self, ctx: ReleaseContext) -> list[tuple[str, str]]:
        """(address, node name) of every node running a task of the service's spec: its published port there."""
        d = await self._docker()
        found, tasks, listed = await asyncio.gather(self._inspect(ctx.spec.name), self._tasks(ctx.qualified_name),
                                                    d.nodes.list())
        if found is None:
            return []
        names = {n["ID"]: (n.get("Description") or {}).get("Hostname", n["ID"][:12]) for n in listed}
        addresses = _node_addresses(list(listed))
        where = set(running_nodes(found, tasks, addresses))
        return sorted({(a, names[i]) for i, a in addresses.items() if a in where})

    async def registry_node(self, ctx: ReleaseContext) -> str | None:
        targets = await self.health_targets(ctx)
        return targets[0][0] if targets else None

    async def logs(self, ctx: ReleaseContext, lines: int = 40) -> Output:
        """The service's last output lines (every task's), and why Swarm stopped it: its own rollback or pause."""
        done = await self.conn.run(["docker", "service", "logs", "--raw", "--tail", str(lines), "--",
                                    ctx.qualified_name], check=False, timeout=30)
        found = await self._inspect(ctx.spec.name)
        reason = None
        if found is not None:
            update = found.get("UpdateStatus") or {}
            reason = rolled_back(found) if update.get("State") in ROLLED_BACK else (
                drift(found) if update.get("State") in PAUSED else None)
        return Output(_tail(done.stdout + done.stderr, lines), None, reason)

    # -- changes

    async def build(self, ctx: ReleaseContext) -> BuildResult:
        tag = self.image(ctx)
        try:
            done = await self.conn.run(build_argv(ctx, tag, image_labels(ctx)), timeout=15 * 60)
        except CommandError as e:
            raise StartError(f"docker build of {tag} failed on {self.host.name}", _tail(e.stderr)) from e
        return BuildResult(tag, {"image": tag, "image_id": done.stdout.strip()[:19]})

    async def _push(self, image: str) -> None:
        try:
            await self.conn.run(["docker", "push", "--quiet", image], timeout=15 * 60)
        except CommandError as e:
            text = e.stderr.lower()
            if any(word in text for word in _UNREACHABLE):
                raise ImageRegistryUnreachable(f"image registry {image.split('/', 1)[0]} not answering a push "
                                               f"from {self.host.name}: {' '.join(_tail(e.stderr, 1))}") from e
            raise StartError(f"docker push {image} failed on {self.host.name}", _tail(e.stderr)) from e

    async def start(self, ctx: ReleaseContext) -> StartResult:
        """Push the image, create or update the service, and wait until Swarm has converged on it."""
        d = await self._docker()
        image = self.image(ctx)
        t0 = time.monotonic()
        await self._push(image)
        spec = service_spec(ctx, image)
        current = await self._inspect(ctx.spec.name)
        before = update_started(current)
        previous = ((current or {}).get("Spec") or {}).get("Labels", {}).get(RELEASE_LABEL)
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
        update = await self._converge(ctx, before, action != "unchanged")
        assert ctx.host.manages is not None  # self.image said so
        return StartResult(ctx.qualified_name, None, previous, {
            "service": ctx.qualified_name, "image": image, "cluster": ctx.host.manages.name, "action": action,
            "push_seconds": pushed, **update})

    def _converge_timeout(self, ctx: ReleaseContext) -> float:
        r = ctx.spec.rollout
        per_task = r.monitor_s + r.delay_s + 30.0
        return 60.0 + per_task * max(1, ctx.spec.swarm_replicas or 3)

    async def _converge(self, ctx: ReleaseContext, before: str | None, updated: bool) -> dict[str, Any]:
        """Wait until the update is completed and every task runs the new template; raise on Swarm's rollback
        or pause, or when it takes longer than the rollout can."""
        t0 = time.monotonic()
        deadline = t0 + self._converge_timeout(ctx)
        polls = 0
        while True:
            polls += 1
            current, tasks = await asyncio.gather(self._inspect(ctx.spec.name), self._tasks(ctx.qualified_name))
            if current is None:
                raise StartError(f"service {ctx.qualified_name} vanished while it was being updated")
            done, failure = converged(current, tasks, ctx.release.id, before, updated)
            if failure is not None:
                raise StartError(failure, (await self.logs(ctx)).lines)
            if done:
                state = (current.get("UpdateStatus") or {}).get("State") if update_started(current) != before else None
                return {"update_state": state or "no rolling update needed",
                        "tasks": sum(1 for t in tasks if t.get("DesiredState") == "running"),
                        "converge_seconds": round(time.monotonic() - t0, 3), "polls": polls}
            if time.monotonic() > deadline:
                raise StartError(f"service {ctx.qualified_name} did not converge within "
                                 f"{self._converge_timeout(ctx):.0f} s: {task_summary(tasks)}",
                                 (await self.logs(ctx)).lines)
            await asyncio.sleep(POLL_S)

    async def discard(self, ctx: ReleaseContext) -> None:
        """A failed first release (no spec to go back to) is removed; otherwise deployerd's rollback sets the
        last good spec again (Start of that release), so nothing is removed here."""
        found = await self._inspect(ctx.spec.name)
        if found is None:
            return
        labels = (found.get("Spec") or {}).get("Labels") or {}
        if labels.get(RELEASE_LABEL) == ctx.release.id and not found.get("PreviousSpec"):
            await self._delete(found["ID"])

    async def _delete(self, service_id: str) -> None:
        try:
            await (await self._docker()).services.delete(service_id)
        except DockerError as e:
            if e.status != 404:
                raise

    async def remove_service(self, service: str) -> Removed:
        owned = await self.owned_dir(service)  # refuses before anything is removed
        releases: set[str] = set()
        for found in await self._services(service):
            releases.update(kept_releases(found))
            await self._delete(found["ID"])
        await self._wait_tasks_gone(self.qualified(service))
        removed = await self._retain(service, [], owned)
        if owned:
            await self.conn.run(["rm", "-rf", "--", self.service_dir(service)])
        return Removed(sorted(releases | set(removed.releases)))

    async def _wait_tasks_gone(self, name: str, limit_s: float = 60.0) -> None:
        """Bounded wait until the manager runs no task container of a removed service (they hold its image)."""
        d = await self._docker()
        filters = json.dumps({"label": [f"com.docker.swarm.service.name={name}"]})
        deadline = time.monotonic() + limit_s
        while await d.containers.list(all=True, filters=filters) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)

    async def retain(self, service: str, keep: list[str]) -> Removed:
        return await self._retain(service, keep, await self.owned_dir(service))

    async def _retain(self, service: str, keep: list[str], owned: bool) -> Removed:
        """Local images on the manager of releases not kept (nor in use by the service's spec or previous
        spec), and their files. Images in the cluster's registry are left to its garbage collection."""
        d = await self._docker()
        in_use: set[str] = set()
        for found in await self._services(service):
            for key in ("Spec", "PreviousSpec"):
                image = (((found.get(key) or {}).get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Image")
                if image:
                    in_use.add(image)
        images = await d.images.list(filters={"label": [f"{IMAGE_SERVICE_LABEL}={self.qualified(service)}",
                                                        f"{IMAGE_INSTANCE_LABEL}={self.instance}"]})
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
        return await self.finish_retention(service, keep, removed, owned)
