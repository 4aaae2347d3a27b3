"""Docker on a host, driven through the host's engine socket forwarded over the one SSH connection.

A release is an image ``deployerd/<service>:<release>`` and a container ``deployerd-<service>-<release>``
labelled with service, release, commit and input digests: the labels are the observed facts, so drift
(a container removed or stopped by hand) is seen without any agent on the host. The image is built once,
on the host, from the transferred release directory, while the previous container keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError

from deployerd.connection import CommandError, Connection
from deployerd.failpoints import failpoint
from deployerd.ingress import allocate_port
from deployerd.observed import Instance, RunState
from deployerd.runtimes.base import (
    LABEL_PREFIX,
    PRIVATE_PORT_LABEL,
    BuildResult,
    Drift,
    Output,
    ReleaseContext,
    Removed,
    Runtime,
    StartError,
    StartResult,
    env_file_text,
)
from deployerd.runtimes.docker_watch import SERVICE_LABEL, container_events

INSTANCE_LABEL = f"{LABEL_PREFIX}instance"


def image_tag(service: str, release: str) -> str:
    return f"deployerd/{service}:{release}"


def container_name(service: str, release: str) -> str:
    return f"deployerd-{service}-{release}"


def _run_state(summary: dict[str, Any]) -> RunState:
    """Map a container summary (``State`` and ``Status`` of the list call) onto a run state."""
    state = summary.get("State", "")
    if state == "running":
        return RunState.RUNNING
    if state == "restarting":
        return RunState.FAILED  # a restart loop
    status = summary.get("Status", "")  # e.g. "Exited (1) 3 seconds ago"
    if state == "exited" and not status.startswith("Exited (0)"):
        return RunState.FAILED
    return RunState.STOPPED


def container_config(ctx: ReleaseContext, private_port: int | None = None) -> dict[str, Any]:
    """The Docker API's create-container body for ``ctx``'s release (pure: same input, same config). Behind an
    ingress it publishes on ``private_port`` of 127.0.0.1 only (the proxy binds the public port), recorded in a
    label where observation finds it."""
    cport = ctx.spec.docker.container_port or ctx.spec.port
    labels = ctx.labels()
    binding = {"HostIp": "0.0.0.0", "HostPort": str(ctx.spec.port)}
    if private_port is not None:
        labels[PRIVATE_PORT_LABEL] = str(private_port)
        binding = {"HostIp": "127.0.0.1", "HostPort": str(private_port)}
    restart: dict[str, Any] = {"Name": "" if ctx.spec.docker.restart == "no" else ctx.spec.docker.restart}
    if ctx.spec.docker.restart == "on-failure":
        restart["MaximumRetryCount"] = 5
    return {
        "Image": image_tag(ctx.qualified_name, ctx.release.id),
        "Env": [f"{k}={v}" for k, v in sorted(ctx.env.items())],
        "Labels": labels,
        "ExposedPorts": {f"{cport}/tcp": {}},
        "HostConfig": {
            # An init as PID 1 forwards SIGTERM: a server that would ignore it as PID 1 (busybox httpd,
            # many scripts) stops at once instead of after Docker's 10 s stop timeout, shortening the switch.
            "Init": True,
            "PortBindings": {f"{cport}/tcp": [binding]},
            "RestartPolicy": restart,
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}},
        },
    }


def build_argv(ctx: ReleaseContext, tag: str | None = None, labels: dict[str, str] | None = None) -> list[str]:
    """``docker build`` of ``ctx``'s release on the host (pure); ``tag`` and ``labels`` default to a container
    release's (the Swarm runtime names its images in the cluster's registry).

    BuildKit: a warm build of a small image takes ~0.3 s where the legacy builder takes ~2 s (and more with
    every --label, each a step of its own); a failed step's output still comes on stderr."""
    argv = ["env", "DOCKER_BUILDKIT=1", "docker", "build", "--quiet", "--tag",
            tag or image_tag(ctx.qualified_name, ctx.release.id)]
    for key, value in (ctx.labels() if labels is None else labels).items():
        argv += ["--label", f"{key}={value}"]
    for key, value in sorted(ctx.spec.docker.build_args.items()):
        argv += ["--build-arg", f"{key}={value}"]
    return argv + ["--file", posixpath.join(ctx.release_dir, ctx.spec.docker.dockerfile), ctx.release_dir]


class EngineAPI:
    """The host's Docker engine API, over its socket forwarded by the host's one SSH connection (shared by the
    Docker and the Swarm runtime)."""

    conn: Connection
    _client: aiodocker.Docker | None = None
    _client_sock: str | None = None

    async def _docker(self) -> aiodocker.Docker:
        sock = await self.conn.docker_socket()
        if self._client is None or self._client_sock != sock:
            await self.close()
            # Our own session, so each API request (a round trip through the SSH tunnel) is counted in the
            # connection's stats next to its commands and SFTP calls.
            stats = self.conn.stats

            async def count(*_: Any) -> None:
                stats.api_requests += 1

            trace = aiohttp.TraceConfig()
            trace.on_request_start.append(count)
            connector = aiohttp.UnixConnector(sock)
            session = aiohttp.ClientSession(connector=connector, trace_configs=[trace])
            self._client = aiodocker.Docker(url="unix://localhost", connector=connector, session=session)
            self._client_sock = sock
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            await self._client.session.close()  # ours (with its connector): aiodocker leaves it open
            self._client = None


class DockerRuntime(EngineAPI, Runtime):
    method = "docker"

    def _filters(self, service: str | None) -> dict[str, list[str]]:
        labels = [f"{INSTANCE_LABEL}={self.instance}",
                  SERVICE_LABEL if service is None else f"{SERVICE_LABEL}={service}"]
        return {"label": labels}

    async def _containers(self, service: str | None = None) -> list[dict[str, Any]]:
        d = await self._docker()
        found = await d.containers.list(all=True, filters=json.dumps(self._filters(service)))
        return sorted((c._container for c in found), key=lambda c: c.get("Created", 0), reverse=True)

    async def observe(self) -> tuple[list[Instance], dict[str, list[str]]]:
        containers = await self._containers()
        instances: list[Instance] = []
        kept: dict[str, list[str]] = {}
        running_services = {
            c["Labels"][SERVICE_LABEL] for c in containers if _run_state(c) is RunState.RUNNING
        }
        seen_current: set[str] = set()
        for c in containers:  # newest first
            labels = c.get("Labels") or {}
            service = labels[SERVICE_LABEL]
            release = labels.get(f"{LABEL_PREFIX}release", "")
            state = _run_state(c)
            # The serving instance: the running one; when none runs, the newest (stopped by hand or crashed).
            current = (state is RunState.RUNNING) if service in running_services else service not in seen_current
            if current:
                seen_current.add(service)
            try:
                inputs = json.loads(labels.get(f"{LABEL_PREFIX}inputs", "{}"))
            except ValueError:
                inputs = {}
            port = labels.get(f"{LABEL_PREFIX}port")
            private = labels.get(PRIVATE_PORT_LABEL, "")
            instances.append(
                Instance(
                    service=service,
                    host=self.host.name,
                    method=self.method,
                    release=release,
                    commit=labels.get(f"{LABEL_PREFIX}commit", ""),
                    state=state,
                    ref=c.get("Id", "")[:12],
                    port=int(port) if port and port.isdigit() else None,
                    private_port=int(private) if private.isdigit() else None,
                    managed_by=labels.get(f"{LABEL_PREFIX}managed_by", "git"),
                    current=current,
                    inputs=inputs,
                    healthy=_docker_health(c),
                )
            )
            kept.setdefault(service, [])
            if release and release not in kept[service]:
                kept[service].append(release)
        return instances, kept

    async def watch(self) -> AsyncIterator[Drift]:
        """The engine's own events of this instance's containers (see ``docker_watch``)."""
        async for drift in container_events(self.conn, self.host.name, f"{INSTANCE_LABEL}={self.instance}"):
            yield drift

    async def has_artifact(self, ctx: ReleaseContext) -> bool:
        d = await self._docker()
        try:
            await d.images.inspect(image_tag(ctx.qualified_name, ctx.release.id))
            return True
        except DockerError as e:
            if e.status == 404:
                return False
            raise

    async def build(self, ctx: ReleaseContext) -> BuildResult:
        tag = image_tag(ctx.qualified_name, ctx.release.id)
        try:
            done = await self.conn.run(build_argv(ctx), timeout=15 * 60)
        except CommandError as e:
            raise StartError(f"docker build of {tag} failed on {self.host.name}", _tail(e.stderr)) from e
        return BuildResult(tag, {"image": tag, "image_id": done.stdout.strip()[:19]})

    async def start(self, ctx: ReleaseContext) -> StartResult:
        """Stop-first (no ingress): the previous release is stopped to free the port, then this one starts.
        Behind an ingress: this one starts beside it on a private port; the switch stops the old one later."""
        d = await self._docker()
        name = container_name(ctx.qualified_name, ctx.release.id)
        # The env file is the host-side record of what the release runs with (0600, outside the build context);
        # written while the service's containers are listed (independent round trips), as is a stop-first
        # start's departure from the proxy.
        async def env_file() -> None:
            await self.conn.run(["install", "-d", "-m", "0700", "--", posixpath.dirname(ctx.env_file)])
            await self.conn.put_bytes(ctx.env_file, env_file_text(ctx.env), mode=0o600)

        async def leave() -> dict[str, object]:  # stop-first: the port is free before anything stops
            return {} if ctx.behind_ingress else await self.leave_ingress(ctx.qualified_name)

        _, mine, left = await asyncio.gather(env_file(), self._containers(ctx.spec.name), leave())
        existing = {c["Names"][0].lstrip("/"): c for c in mine}
        stopped = [] if ctx.behind_ingress else await self._stop(ctx, existing)
        reused = name in existing
        if reused and not await self._reusable(existing[name], ctx):
            await d.containers.container(existing[name]["Id"]).delete(force=True)
            reused = False
        private = await self._private_port(ctx, existing[name] if reused else None)
        try:
            if not reused:
                container = await d.containers.create(container_config(ctx, private), name=name)
            else:
                container = d.containers.container(existing[name]["Id"])
            await failpoint("Start Service")  # test-only: old one stopped, new one created, not started
            if not (reused and existing[name].get("State") == "running"):
                await container.start()
        except DockerError as e:
            raise StartError(f"container {name} did not start on {self.host.name}: {e.message}") from e
        previous = release_of(stopped[0]) if stopped else None
        return StartResult(name, reused, previous, {"container": name, "stopped": stopped,
                                                    **({"left_proxy": left} if left else {})}, private)

    async def _stop(self, ctx: ReleaseContext, existing: dict[str, dict[str, Any]]) -> list[str]:
        d = await self._docker()
        name = container_name(ctx.qualified_name, ctx.release.id)
        stopped = []
        for cname, c in existing.items():  # the previous release is kept, stopped
            if cname != name and c.get("State") in ("running", "restarting"):
                await d.containers.container(c["Id"]).stop(t=10)
                stopped.append(cname)
        return stopped

    async def stop_others(self, ctx: ReleaseContext) -> list[str]:
        return await self._stop(ctx, {c["Names"][0].lstrip("/"): c for c in await self._containers(ctx.spec.name)})

    async def stop_unproxied(self, ctx: ReleaseContext) -> list[str]:
        """Containers of the service publishing the public port themselves (no private port label) stop, kept."""
        d = await self._docker()
        stopped = []
        for c in await self._containers(ctx.spec.name):
            if PRIVATE_PORT_LABEL not in (c.get("Labels") or {}) and c.get("State") in ("running", "restarting"):
                await d.containers.container(c["Id"]).stop(t=10)
                stopped.append(c["Names"][0].lstrip("/"))
        return stopped

    async def start_unproxied(self, ctx: ReleaseContext, stopped: list[str]) -> None:
        d = await self._docker()
        for name in stopped:
            await d.containers.container(name).start()

    async def _private_port(self, ctx: ReleaseContext, kept: dict[str, Any] | None) -> int | None:
        """Behind an ingress: the kept container's port, else a free one: recorded by no container of any
        deployerd instance on the host (kept ones start on theirs again) and not listening there (a systemd
        release's, a process deployerd does not know)."""
        if not ctx.behind_ingress:
            return None
        label = ((kept or {}).get("Labels") or {}).get(PRIVATE_PORT_LABEL, "")
        if label.isdigit():
            return int(label)
        d = await self._docker()
        listening, found = await asyncio.gather(
            self.listening_ports(), d.containers.list(all=True, filters=json.dumps({"label": [PRIVATE_PORT_LABEL]})))
        labels = [(c._container.get("Labels") or {}).get(PRIVATE_PORT_LABEL, "") for c in found]
        return allocate_port(listening | {int(p) for p in labels if p.isdigit()}, ctx.qualified_name)

    async def _reusable(self, kept: dict[str, Any], ctx: ReleaseContext) -> bool:
        """Can the kept container of ``ctx``'s release start again as it is? Not when it holds other env values
        than ``ctx`` (a restored release runs with the values resolved now: a rotated secret), nor, stopped behind
        an ingress, when something took its private port meanwhile: it is then created again from its kept
        image, with a port that is free."""
        label = (kept.get("Labels") or {}).get(PRIVATE_PORT_LABEL, "")

        async def port_taken() -> bool:
            if not (ctx.behind_ingress and label.isdigit()) or kept.get("State") == "running":
                return False
            return int(label) in await self.listening_ports()

        same_env, taken = await asyncio.gather(self._env_matches(kept["Id"], ctx), port_taken())
        return same_env and not taken

    async def _env_matches(self, container_id: str, ctx: ReleaseContext) -> bool:
        """Does the container run with ``ctx.env``? (Compared in memory: values are never shown or logged.)"""
        d = await self._docker()
        info = await d.containers.container(container_id).show()
        have = set((info.get("Config") or {}).get("Env") or [])
        return all(f"{k}={v}" in have for k, v in ctx.env.items())

    async def _show(self, ctx: ReleaseContext) -> dict[str, Any] | None:
        d = await self._docker()
        try:
            info: dict[str, Any] = await d.containers.container(container_name(ctx.qualified_name,
                                                                               ctx.release.id)).show()
        except DockerError as e:
            if e.status == 404:
                return None
            raise
        return info

    async def state(self, ctx: ReleaseContext) -> RunState | None:
        info = await self._show(ctx)
        if info is None:
            return None
        st = info["State"]
        if st.get("Restarting") or (not st.get("Running") and st.get("ExitCode", 0) != 0):
            return RunState.FAILED
        return RunState.RUNNING if st.get("Running") else RunState.STOPPED

    async def logs(self, ctx: ReleaseContext, lines: int = 40) -> Output:
        """The container's output since its latest start (a kept container started again also holds what its
        earlier run wrote), and its exit code when it is not running."""
        try:
            info = await self._show(ctx)
            if info is None:
                return Output([])
            st = info.get("State") or {}
            since = _epoch(st.get("StartedAt", ""))
            out = await (await self._docker()).containers.container(info["Id"]).log(
                stdout=True, stderr=True, tail=lines, since=since or 0)  # 0: from the first line
        except DockerError:
            return Output([])
        code = None if st.get("Running") else st.get("ExitCode")
        return Output([line.rstrip("\n") for line in out][-lines:], code)

    async def discard(self, ctx: ReleaseContext) -> None:
        await self._remove_container(container_name(ctx.qualified_name, ctx.release.id))

    async def _remove_container(self, ref: str, attempts: int = 20) -> None:
        """Force-remove a container. One in a restart loop (a release that exits at once) can be neither killed
        nor removed between two restarts (HTTP 500 "... is not running"): its restart policy is turned off,
        then the removal is tried again (bounded)."""
        d = await self._docker()
        for attempt in range(attempts):
            try:
                await d.containers.container(ref).delete(force=True)
                return
            except DockerError as e:
                if e.status == 404:
                    return
                if e.status != 500 or attempt == attempts - 1:
                    raise
            await self.conn.run(["docker", "update", "--restart", "no", ref], check=False)
            await asyncio.sleep(0.5)

    async def _delete_image(self, image_id: str) -> None:
        try:
            await (await self._docker()).images.delete(image_id, force=True)
        except DockerError as e:
            if e.status != 404:
                raise

    async def has_instances(self, service: str) -> bool:
        return bool(await self._containers(service))

    async def remove_service(self, service: str) -> Removed:
        owned = await self.owned_dir(service)  # refuses before anything is removed
        await self.leave_ingress(self.qualified(service))  # the proxy stops taking its public port first
        releases = {c["Labels"].get(f"{LABEL_PREFIX}release", "") for c in await self._containers(service)}
        removed = await self._retain(service, keep=[], owned=owned)
        if owned:
            await self.conn.run(["rm", "-rf", "--", self.service_dir(service)])
        return Removed(sorted(releases | set(removed.releases)))

    async def retain(self, service: str, keep: list[str]) -> Removed:
        return await self._retain(service, keep, await self.owned_dir(service))

    async def _retain(self, service: str, keep: list[str], owned: bool) -> Removed:
        """The three listings at once, then the containers removed together, then their images: each step is
        independent round trips (a deploy's retention was ~8 in a row, 0.1-0.4 s by bench/reconcile_bench.py)."""
        d = await self._docker()
        containers, images, on_host = await asyncio.gather(
            self._containers(service), d.images.list(filters=self._filters(service)),
            self.host_releases(service) if owned else _nothing())
        gone = [c for c in containers if c["Labels"].get(f"{LABEL_PREFIX}release", "") not in keep]
        await asyncio.gather(*(self._remove_container(c["Id"]) for c in gone))
        unused = [i for i in images if (i.get("Labels") or {}).get(f"{LABEL_PREFIX}release", "") not in keep]
        await asyncio.gather(*(self._delete_image(i["Id"]) for i in unused))
        removed = {c["Labels"].get(f"{LABEL_PREFIX}release", "") for c in gone}
        removed |= {(i.get("Labels") or {}).get(f"{LABEL_PREFIX}release", "") for i in unused}
        return await self.finish_retention(service, keep, removed, owned, on_host)


async def _nothing() -> set[str]:
    return set()


def _docker_health(summary: dict[str, Any]) -> bool | None:
    """Docker's own HEALTHCHECK verdict when the image defines one (shown in the list call's Status)."""
    status = summary.get("Status", "")
    if "(unhealthy)" in status:
        return False
    if "(healthy)" in status:
        return True
    return None


def release_of(container: str) -> str:
    """The release id in a container name (``container_name``'s last part)."""
    return container.rsplit("-", 1)[-1]


def _epoch(started_at: str) -> int | None:
    """Docker's ``StartedAt`` (RFC 3339, nanoseconds) as whole seconds since the epoch; None when unset."""
    if not started_at or started_at.startswith("0001-"):
        return None
    try:
        return int(datetime.fromisoformat(started_at[:19]).replace(tzinfo=UTC).timestamp())
    except ValueError:
        return None


def _tail(text: str, lines: int = 40) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-lines:]
