"""The status page's cost at scale: rendering the overview of N services on 3 hosts, and what one change sends.

A render runs on a thread (never on the event loop) once per burst of events, shared by every browser; then each
browser gets only the rows that changed. Printed next to a baseline measured in the same run: the same rows as
the JSON that ``GET /services`` answers. No daemon, no hosts: the views are built from synthetic rows.

    .venv/bin/python bench/ui_bench.py [N ...]      # default: 50 200 500
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, cast

from deployerd.source import CommitInfo
from deployerd.store import Quarantine
from deployerd.ui import Pages
from deployerd.ui.live import LiveJobs
from deployerd.ui.views import Cell, LiveJob, Overview, Row

HOSTS = ["prod-1", "prod-2", "prod-3"]
REPEAT = 7


def overview(n: int) -> Overview:
    commit = CommitInfo(sha="ab" * 20, author="Ada <ada@example.org>", committer="Ada <ada@example.org>",
                        date="2026-12-01T12:00:00+00:00", message="web: bump the cache size\n\nbody")
    rows = []
    for i in range(n):
        host = i % len(HOSTS)
        cell = Cell(service=f"svc-{i:03d}", host=HOSTS[host], sync="Synced", health="Healthy", release=f"{i:012x}",
                    running_release=f"{i:012x}", commit=commit, commit_sha=commit.sha, managed_by="git",
                    url=f"http://10.0.0.{host}:{8000 + i}",
                    quarantine=Quarantine(service=f"svc-{i:03d}", release=f"{i:012x}", job_id="deploy-1",
                                          reason="Verify Health failed", created_at="2026-12-01T12:00:00Z")
                    if i % 50 == 7 else None,
                    job=LiveJob(job_id="deploy-2", kind="deploy", phase="Build") if i % 40 == 3 else None)
        cells: list[Cell | None] = [None] * len(HOSTS)
        cells[host] = cell
        rows.append(Row(service=cell.service, cells=cells))
    return Overview(hosts=HOSTS, rows=rows, revision=commit, revision_sha=commit.sha,
                    reconciled_at="2026-12-01T12:00:01.000000Z", reconcile_error=None, git_error=None)


def timed(fn: Any) -> float:
    runs = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main(sizes: list[int]) -> None:
    pages = Pages(cast(Any, None), LiveJobs())  # _overview renders views only: no engine needed
    print(f"{'services':>8} {'render ms':>10} {'JSON ms':>8} {'ratio':>6} {'page KiB':>9} {'JSON KiB':>9} "
          f"{'one row B':>10}")
    for n in sizes:
        o = overview(n)
        as_json = [{"name": c.service, "host": c.host, "sync_status": c.sync, "health_status": c.health,
                    "release": c.release, "running_release": c.running_release, "commit": c.commit_sha,
                    "url": c.url} for r in o.rows for c in r.cells if c]
        render_s = timed(lambda o=o: pages._overview(o))
        json_s = timed(lambda rows=as_json: json.dumps({"services": rows}))
        rendered = pages._overview(o)
        row = rendered.parts[o.rows[0].dom_id]
        print(f"{n:>8} {render_s * 1000:>10.1f} {json_s * 1000:>8.2f} {render_s / json_s:>6.0f} "
              f"{len(rendered.main) / 1024:>9.0f} {len(json.dumps({'services': as_json})) / 1024:>9.0f} "
              f"{len(row):>10}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [50, 200, 500])
