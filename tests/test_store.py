"""The store on a real SQLite file: what a restart must keep, and what it marks as interrupted."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployerd.store import (
    PHASES,
    Job,
    JobStatus,
    OutOfBandService,
    PhaseStatus,
    Quarantine,
    ReleaseRecord,
    Store,
    utcnow,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


def release(rel: str, status: str, good_at: str | None) -> ReleaseRecord:
    return ReleaseRecord(service="web", release=rel, host="h", method="docker", commit="c" * 40, status=status,
                         created_at=utcnow(), last_good_at=good_at)


async def test_jobs_releases_and_quarantine_survive_reopen(tmp_path: Path) -> None:
    db = tmp_path / "state" / "deployerd.db"
    store = await Store.open(db)
    job = Job(service="web", host="h", reasons=["not deployed on h"])
    for name in PHASES:
        job.phase(name)
    job.phase("Validation").status = PhaseStatus.SUCCEEDED
    job.status = JobStatus.RUNNING
    await store.save_job(job)
    done = Job(service="web", host="h", status=JobStatus.SUCCEEDED)
    await store.save_job(done)
    await store.save_release(release("aaa", "good", "2026-01-01T00:00:00.000000Z"))
    await store.save_release(release("bbb", "good", "2026-01-02T00:00:00.000000Z"))
    await store.save_release(release("ccc", "failed", None))
    await store.quarantine(Quarantine(service="web", release="ccc", job_id=done.id, reason="Build failed",
                                      created_at=utcnow()))
    await store.close()

    store = await Store.open(db)  # a restart
    assert await store.mark_interrupted() == [job.id]
    back = await store.job(job.id)
    assert back is not None and back.status is JobStatus.INTERRUPTED
    assert back.phase("Validation").status is PhaseStatus.SUCCEEDED
    assert (await store.job(done.id)).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]
    assert (await store.last_good("web")).release == "bbb"  # type: ignore[union-attr]
    assert (await store.last_good("web", exclude="bbb")).release == "aaa"  # type: ignore[union-attr]
    assert (await store.quarantined())["web"].release == "ccc"
    # a release that failed once and later succeeded keeps its good time (COALESCE), and vice versa
    await store.save_release(release("aaa", "failed", None))
    assert (await store.last_good("web", exclude="bbb")) is None
    await store.lift_quarantine("web")
    assert await store.quarantined() == {}
    assert [j.id for j in await store.jobs("web")] and await store.jobs("other") == []
    await store.close()


async def test_lifting_a_quarantine_of_another_release_keeps_it(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite")
    await store.quarantine(Quarantine(service="web", release="bad", job_id="j", reason="r", created_at=utcnow()))
    await store.lift_quarantine("web", "good")  # restoring the last good release
    assert (await store.quarantined())["web"].release == "bad"
    await store.lift_quarantine("web", "bad")  # the quarantined release itself deployed fine (forced)
    assert await store.quarantined() == {}
    await store.close()


async def test_interrupted_deploys_are_those_still_the_latest_job_of_their_service(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite")
    older = Job(service="web", host="h", release="r1", status=JobStatus.RUNNING, created_at="2026-01-01T00:00:00Z")
    later = Job(service="web", host="h", release="r1", status=JobStatus.SUCCEEDED, created_at="2026-01-02T00:00:00Z")
    cut = Job(service="api", host="h", release="r2", status=JobStatus.RUNNING)
    pruning = Job(service="gone", host="h", kind="prune", status=JobStatus.RUNNING)
    oob = Job(service="oob", host="h", release="r3", managed_by="api", status=JobStatus.PENDING)
    for job in (older, later, cut, pruning, oob):
        await store.save_job(job)
    assert await store.interrupted_deploys() == {}  # running jobs are not interrupted until a restart says so
    assert sorted(await store.mark_interrupted()) == sorted([older.id, cut.id, pruning.id, oob.id])
    # web's interrupted deploy was followed by a finished one; prunes and out-of-band deploys are not git's
    assert await store.interrupted_deploys() == {"api": "r2"}
    await store.close()


async def test_out_of_band_services_survive_reopen_until_forgotten(tmp_path: Path) -> None:
    """What POST /deploy deployed is reconciled after a restart (Registry loss, a stop by hand) until removed."""
    db = tmp_path / "deployerd.db"
    store = await Store.open(db)
    await store.save_out_of_band(OutOfBandService(service="adhoc", host="h", release="r1"))
    await store.save_out_of_band(OutOfBandService(service="adhoc", host="h", release="r2"))  # a newer good one
    await store.save_out_of_band(OutOfBandService(service="other", host="h2", release="x1"))
    await store.close()
    store = await Store.open(db)
    rows = await store.out_of_band()
    assert {n: (r.host, r.release) for n, r in rows.items()} == {"adhoc": ("h", "r2"), "other": ("h2", "x1")}
    await store.forget_out_of_band("adhoc")
    assert set(await store.out_of_band()) == {"other"}
    await store.close()


async def test_a_fleet_host_cut_short_counts_and_a_rollout_record_is_not_a_deploy(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite")
    parent = Job(service="fleet", host="h1", kind="rollout", release="r2", status=JobStatus.RUNNING,
                 created_at="2026-01-01T00:00:00Z")
    cut = Job(service="fleet", host="h1", release="r2", parent=parent.id, status=JobStatus.RUNNING,
              created_at="2026-01-01T00:00:01Z")
    ended = Job(service="fleet", host="h2", release="r2", parent=parent.id, status=JobStatus.SUCCEEDED,
                created_at="2026-01-01T00:00:02Z")  # the same wave: started after it, ended before the kill
    earlier = Job(service="web", host="h", release="r7", status=JobStatus.RUNNING, created_at="2026-01-01T00:00:00Z")
    later_rollout = Job(service="web", host="h", kind="rollout", status=JobStatus.RUNNING,
                        created_at="2026-01-02T00:00:00Z")  # started, then cut short before its first host
    for job in (parent, cut, ended, earlier, later_rollout):
        await store.save_job(job)
    await store.mark_interrupted()
    assert await store.interrupted_deploys() == {"fleet": "r2", "web": "r7"}
    assert (await store.job(parent.id)).status is JobStatus.INTERRUPTED  # type: ignore[union-attr]
    await store.close()


async def test_a_fleet_release_keeps_every_host_it_ran_on(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite")
    for host in ("h1", "h2"):
        rec = release("aaa", "good", utcnow()).model_copy(update={
            "host": host, "hosts": [host], "spec": {"hosts": {host: {"host": {"name": host}, "inputs": {"h": host}}}}})
        await store.save_release(rec)
    got = await store.last_good("web")
    assert got is not None and got.ran_on == ["h1", "h2"] and got.host == "h2"
    assert sorted(got.spec["hosts"]) == ["h1", "h2"] and got.spec["hosts"]["h1"]["inputs"] == {"h": "h1"}
    await store.set_release_status("web", "aaa", "failed")
    assert await store.last_good("web") is None
    assert (await store.releases("web"))[0].status == "failed"
    assert release("old", "good", utcnow()).ran_on == ["h"]  # a record from before fleets: its one host
    await store.close()
