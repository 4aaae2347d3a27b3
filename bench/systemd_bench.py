"""A systemd deploy on one sandbox host, phase by phase: round trips (the host's operation counters,
``HostStats``, as /metrics deployerd_host_operations_total counts them) and seconds of Transfer, Build and
Start Service; then an env-only change and a command-only change of the same service, whose Build should not
rebuild the venv (its dependencies did not change).

The service has a requirements file and an offline wheel, so a venv build runs pip. Drives the runtime
directly (no daemon, no Registry). Times are only comparable within one run (the machine is shared).

Run: `DEPLOYERD_BENCH_SANDBOX=/tmp/bench-sbx .venv/bin/python bench/systemd_bench.py`
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deployerd import transfer as tr  # noqa: E402
from _common import bench_host  # noqa: E402

from deployerd.connection import Connection  # noqa: E402
from deployerd.desired import HostSpec, ServiceSpec, compute_release  # noqa: E402
from deployerd.runtimes.base import ReleaseContext  # noqa: E402
from deployerd.runtimes.systemd import SystemdRuntime  # noqa: E402
from deployerd.tree import DirTree  # noqa: E402

APP = "import sys, http.server\nhttp.server.test(port=int(sys.argv[1]))\n"


def wheel(out: Path) -> None:
    """A one-module pure-Python wheel written by hand (no build tool, no network)."""
    dist, files = "benchdep-1.0.dist-info", {"benchdep/__init__.py": "V = 1\n"}
    files[f"{dist}/METADATA"] = "Metadata-Version: 2.1\nName: benchdep\nVersion: 1.0\n"
    files[f"{dist}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = [f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(t)}" for p, t in files.items()] + [f"{dist}/RECORD,,"]
    out.mkdir(parents=True)
    with zipfile.ZipFile(out / "benchdep-1.0-py3-none-any.whl", "w") as z:
        for p, t in files.items():
            z.writestr(p, t)
        z.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")


def context(host: HostSpec, tree: DirTree, env: dict[str, str], command: str) -> ReleaseContext:
    spec = ServiceSpec.model_validate({"name": "sdbench", "host": host.name, "port": 8997, "source": "svc",
                                       "method": "systemd", "env": env, "systemd": {"command": command}})
    return ReleaseContext(spec=spec, host=host, release=compute_release(spec, host, tree.entries("svc")),
                          commit="c" * 40, env=env)


async def measure(conn: Connection, what: str, work: Any) -> Any:
    before, t0 = conn.stats.round_trips, time.monotonic()
    result = await work
    print(f"  {what:<14} {conn.stats.round_trips - before:>3} round trips  {time.monotonic() - t0:6.2f} s",
          flush=True)
    return result


async def deploy(conn: Connection, rt: SystemdRuntime, tree: DirTree, ctx: ReleaseContext, previous: str | None,
                 label: str) -> None:
    print(f"{label} (release {ctx.release.id}):")
    await measure(conn, "Transfer", tr.transfer(conn, tree, ctx, previous))
    await measure(conn, "Build", rt.build(ctx))
    await measure(conn, "Start Service", rt.start(ctx))


async def main() -> None:
    h, conn = await bench_host()
    host = HostSpec(name=h.name, address="127.0.0.1", base_dir=f"/opt/deployerd-sd-bench-{secrets.token_hex(4)}")
    tmp = Path(tempfile.mkdtemp(prefix="deployerd-sdbench-"))
    (tmp / "svc").mkdir()
    (tmp / "svc/app.py").write_text(APP)
    (tmp / "svc/requirements.txt").write_text("benchdep==1.0\n")
    wheel(tmp / "svc/wheels")
    tree = DirTree(tmp)
    rt = SystemdRuntime(conn, host)
    command = "python3 app.py {port}"
    try:
        first = context(host, tree, {"A": "1"}, command)
        await deploy(conn, rt, tree, first, None, "first deploy")
        env = context(host, tree, {"A": "2"}, command)
        await deploy(conn, rt, tree, env, first.release.id, "env-only change")
        cmd = context(host, tree, {"A": "2"}, "python3 -u app.py {port}")
        await deploy(conn, rt, tree, cmd, env.release.id, "command-only change")
    finally:
        await rt.remove_service("sdbench")
        await conn.run(["rm", "-rf", "--", host.base_dir])
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
