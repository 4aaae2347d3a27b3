"""The Transfer phase alone, block deltas on vs off, interleaved on one sandbox host (scenario 3's tree).

Each round changes 16 bytes of one 100 KiB file in a 20 MB tree of 200 files and transfers a new release
twice from the same previous one: once as deployerd does (delta), once with deltas off (the changed file
written whole over SFTP, as before deltas). Prints seconds and bytes per round and the medians; times are
only comparable within one run (the machine is shared).

Run: `DEPLOYERD_BENCH_SANDBOX=/tmp/bench-sbx .venv/bin/python bench/transfer_bench.py` (BENCH_ROUNDS, default 5).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bench_host, med  # noqa: E402
from peers import big_tree, touch_one, write_source  # noqa: E402

from deployerd import transfer as tr  # noqa: E402
from deployerd.desired import HostSpec, Release, ServiceSpec  # noqa: E402
from deployerd.runtimes.base import ReleaseContext  # noqa: E402
from deployerd.tree import DirTree  # noqa: E402


def context(host: str, base: str, release: str) -> ReleaseContext:
    spec = ServiceSpec(name="tbench", host=host, port=8998, source="svc")
    return ReleaseContext(spec=spec, host=HostSpec(name=host, address="127.0.0.1", base_dir=base),
                          release=Release(id=release, inputs={}), commit="c" * 40)


async def main() -> None:
    h, conn = await bench_host()
    base = f"/opt/deployerd-transfer-bench-{secrets.token_hex(4)}"
    tmp = Path(tempfile.mkdtemp(prefix="deployerd-tbench-"))
    src = tmp / "svc"
    write_source(src, "tbench", 8998, "0")
    big_tree(src)
    tree = DirTree(tmp)
    on = tr.DELTA_MIN_SIZE
    out: dict[str, list[float]] = {"delta_s": [], "whole_s": [], "delta_bytes": [], "whole_bytes": []}
    try:
        await tr.transfer(conn, tree, context(h.name, base, "r0"), None)
        for r in range(1, int(os.environ.get("BENCH_ROUNDS", "5")) + 1):
            touch_one(src, r)
            runs = [("delta", on), ("whole", 1 << 62)]
            for mode, threshold in runs if r % 2 else runs[::-1]:  # alternate who goes first
                tr.DELTA_MIN_SIZE = threshold
                t0 = time.monotonic()
                res = await tr.transfer(conn, tree, context(h.name, base, f"r{r}-{mode}"), f"r{r - 1}-delta"
                                        if r > 1 else "r0")
                out[f"{mode}_s"].append(time.monotonic() - t0)
                out[f"{mode}_bytes"].append(res["bytes_sent"])
            tr.DELTA_MIN_SIZE = on
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in out.items()), flush=True)
        print("medians: " + ", ".join(f"{k} {med(v):.3f}" for k, v in out.items()))
    finally:
        tr.DELTA_MIN_SIZE = on
        await conn.run(["rm", "-rf", "--", base])
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
