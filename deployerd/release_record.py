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
            "hosts": {ctx.host.name: {"host": ctx.host.model_dump(mode="json"), "inputs": ctx.release.inputs}},
        },
        hosts=[ctx.host.name],
    )


def context_from_record(rec: ReleaseRecord, host: str | None = None) -> ReleaseContext:
    """Rebuild a past release's context from the store, to restore it without git (secrets not resolved:
    `Deployer.context_for` adds them). ``host``: the fleet host to restore it on (its own HostSpec and
    per-host inputs, as it was deployed there); default the host that saved the record last."""
    spec = ServiceSpec.model_validate(rec.spec["service"])
    there = rec.spec.get("hosts", {}).get(host or rec.host) or rec.spec
    return ReleaseContext(
        spec=spec,
        host=HostSpec.model_validate(there["host"]),
        release=Release(id=rec.release, inputs=there.get("inputs", {})),
        commit=rec.commit,
        managed_by=rec.spec.get("managed_by", "git"),
        instance=rec.spec.get("instance", "default"),
        env=dict(spec.env),
    )
