"""A release's record in the store, and its context rebuilt from that record (to restore it without git)."""

from __future__ import annotations

from deployerd.desired import HostSpec, Release, ServiceSpec
from deployerd.runtimes import ReleaseContext
from deployerd.store import ReleaseRecord, utcnow


def release_record(ctx: ReleaseContext, status: str) -> ReleaseRecord:
    now = utcnow()
    return ReleaseRecord(
        service=ctx.spec.name,
        release=ctx.release.id,
        host=ctx.host.name,
        method=ctx.spec.method,
        commit=ctx.commit,
        status=status,
        created_at=now,
        last_good_at=now if status == "good" else None,
        spec={
            "service": ctx.spec.model_dump(mode="json"),
            "host": ctx.host.model_dump(mode="json"),
            "inputs": ctx.release.inputs,
            "managed_by": ctx.managed_by,
            "instance": ctx.instance,
        },
    )


def context_from_record(rec: ReleaseRecord) -> ReleaseContext:
    """Rebuild a past release's context from the store, to restore it without git (secrets not resolved:
    `Deployer.context_for` adds them)."""
    spec = ServiceSpec.model_validate(rec.spec["service"])
    return ReleaseContext(
        spec=spec,
        host=HostSpec.model_validate(rec.spec["host"]),
        release=Release(id=rec.release, inputs=rec.spec.get("inputs", {})),
        commit=rec.commit,
        managed_by=rec.spec.get("managed_by", "git"),
        instance=rec.spec.get("instance", "default"),
        env=dict(spec.env),
    )
