"""Command line: the daemon (``run``), its read-outs (``plan``, ``status``, ``history``), ``validate``, ``sync``,
and the tools around it (``sandbox``, ``registry serve``, ``demo``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import typer

from deployerd.config import Settings, load_settings

app = typer.Typer(help="deployerd: GitOps deployments to servers over SSH (Docker and systemd).", no_args_is_help=True,
                  pretty_exceptions_enable=False)
sandbox_app = typer.Typer(help="Throwaway production-like test hosts on this machine.", no_args_is_help=True)
registry_app = typer.Typer(help="The embedded Registry.", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(registry_app, name="registry")

ConfigOpt = typer.Option(None, "--config", "-c",
                         help="config file (default /etc/deployerd/config.yaml or $DEPLOYERD_CONFIG)")
UrlOpt = typer.Option(None, "--url", help="the daemon's API (default: from the config's listen address)")


def _settings(config: Path | None) -> Settings:
    named = config or (Path(os.environ["DEPLOYERD_CONFIG"]) if os.environ.get("DEPLOYERD_CONFIG") else None)
    if named is not None and not named.is_file():  # the default file may be absent (all set in DEPLOYERD_*)
        typer.echo(f"configuration error: config file {named} not found: create it (see README, Configure) or "
                   "give another with --config FILE", err=True)
        raise typer.Exit(2)
    try:
        return load_settings(config)
    except Exception as e:
        typer.echo(f"configuration error: {e}", err=True)
        raise typer.Exit(2) from e


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("asyncssh", "httpx", "apscheduler"):  # per-request lines; warnings still show
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _api(settings: Settings, url: str | None) -> str:
    host = "127.0.0.1" if settings.listen_host in ("0.0.0.0", "::") else settings.listen_host
    return url or f"http://{host}:{settings.listen_port}"


def _get(url: str, params: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Any:
    try:
        resp = httpx.get(url, params=params, headers=headers, timeout=10)
    except httpx.HTTPError as e:
        typer.echo(f"cannot reach the daemon at {url}: {e}", err=True)
        raise typer.Exit(1) from e
    if resp.status_code >= 400:
        typer.echo(f"{url}: HTTP {resp.status_code}: {_detail(resp)}", err=True)
        raise typer.Exit(1)
    return resp.json()


def _detail(resp: httpx.Response) -> str:
    """An error answer's own words (FastAPI's ``detail``), else its body."""
    try:
        detail = resp.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return detail if isinstance(detail, str) else resp.text


@app.command()
def run(config: Path | None = ConfigOpt, verbose: bool = typer.Option(False, "-v")) -> None:
    """Run the daemon: watch git, reconcile, serve the API."""
    from deployerd import memory
    from deployerd.daemon import serve

    memory.limit_arenas()  # before the event loop's worker threads exist
    _logging(verbose)
    asyncio.run(serve(_settings(config)))


@app.command()
def plan(config: Path | None = ConfigOpt) -> None:
    """Show what would change and why, changing nothing."""
    from deployerd.daemon import close_engine, open_engine
    from deployerd.plan import describe

    async def main() -> str:
        engine = await open_engine(_settings(config))
        try:
            await engine.recall_interrupted()
            snap = await engine.preview()
            errors = "".join(f"invalid: {e}\n" for e in snap.desired.errors)
            return f"revision {snap.desired.revision[:12]}\n{errors}{describe(snap.actions)}"
        finally:
            await close_engine(engine)

    typer.echo(asyncio.run(main()))


@app.command()
def status(config: Path | None = ConfigOpt, url: str | None = UrlOpt,
           as_json: bool = typer.Option(False, "--json")) -> None:
    """Services with their sync and health status (asks the running daemon)."""
    data = _get(f"{_api(_settings(config), url)}/services")
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(f"revision {(data.get('revision') or '?')[:12]}")
    for s in data["services"]:
        typer.echo(f"{s['name']:<24} {s['sync_status']:<10} {s['health_status']:<11} "
                   f"{(s['running_release'] or '-'):<13} {s['host']:<10} {s.get('url') or ''}")
        for h in s.get("hosts") or []:  # a fleet: every host's own release
            typer.echo(f"{'':<2}{'@' + h['host']:<22} {h['sync_status']:<10} {h['health_status']:<11} "
                       f"{(h['running_release'] or '-'):<13} {'':<10} {h.get('url') or ''}")
        if s["sync_status"] != "Synced" or s["health_status"] != "Healthy":
            for reason in s["reasons"]:
                typer.echo(f"{'':<24} - {reason}")
        if s["sync_status"] != "Synced" or s["health_status"] != "Healthy":
            last = _get(f"{_api(_settings(config), url)}/services/{s['name']}").get("last_job") or {}
            if last.get("error"):  # say why: the last job's error and the failed release's own output
                _why(24, last)


@app.command()
def history(name: str, config: Path | None = ConfigOpt, url: str | None = UrlOpt, limit: int = 10) -> None:
    """Jobs, releases and quarantine of one service."""
    data = _get(f"{_api(_settings(config), url)}/services/{name}/history?limit={limit}")
    if data["quarantine"]:
        q = data["quarantine"]
        typer.echo(f"QUARANTINED release {q['release']}: {q['reason']}")
    for j in data["jobs"]:
        typer.echo(f"{j['started_at'] or '':<28} {j['id']} {j['status']:<12} release {j['release'] or '-'} "
                   f"commit {(j['commit'] or '-')[:12]} {'; '.join(j['reasons'])}")
        if j["error"]:
            _why(28, j)


def _why(indent: int, job: dict[str, Any], lines: int = 15) -> None:
    """A failed job's error, then the last output lines of the release that failed (build or journal)."""
    typer.echo(f"{'':<{indent}} error: {job['error']}")
    for line in (job.get("logs") or [])[-lines:]:
        typer.echo(f"{'':<{indent}} | {line}")


@app.command()
def validate(path: Path = typer.Argument(..., help="a desired-state folder (hosts.yaml, services/)")) -> None:
    """Validate a desired-state folder; every error names the file, the field and the reason."""
    from deployerd.desired import load_desired
    from deployerd.tree import DirTree

    if not path.is_dir():
        typer.echo(f"error: {path} is not a folder: give the desired-state folder holding hosts.yaml and services/",
                   err=True)
        raise typer.Exit(2)
    desired = load_desired(DirTree(path), revision="working-tree")
    for e in desired.errors:
        typer.echo(f"error: {e}", err=True)
    for name, release in sorted(desired.releases.items()):
        spec = desired.services[name]
        where = ", ".join(f"{h}:{spec.port}" for h in spec.placed_on)
        typer.echo(f"ok: {name} ({spec.method} on {where}) release {release.id}")
    raise typer.Exit(1 if desired.errors else 0)


def _write(method: str, config: Path | None, url: str | None, path: str, body: Any, what: str) -> Any:
    """Call a route that changes something, with the API token; exit 1 naming the refusal."""
    settings = _settings(config)
    token = settings.secret("api_token")
    if token is None:
        typer.echo("no api_token_file configured: cannot authenticate to the daemon", err=True)
        raise typer.Exit(2)
    resp = httpx.request(method, f"{_api(settings, url)}{path}", json=body,
                         headers={"Authorization": f"Bearer {token}"}, timeout=120)
    if resp.status_code >= 400:
        typer.echo(f"{what} refused: HTTP {resp.status_code}: {_detail(resp)}", err=True)
        raise typer.Exit(1)
    return resp.json()


@app.command()
def remove(name: str, config: Path | None = ConfigOpt, url: str | None = UrlOpt) -> None:
    """Remove an out-of-band service (one POST /deploy deployed): its instances, files and Registry entry."""
    data = _write("DELETE", config, url, f"/deploy/services/{name}", None, "remove")
    typer.echo(f"removing {name}: job {data['deploy_job_id']} (deployerd history {name})")


@app.command()
def sync(name: str | None = typer.Argument(None),
         force: bool = typer.Option(False, "--force", help="deploy even a quarantined release"),
         prune_all: bool = typer.Option(False, "--prune-all",
                                        help="let a commit that removes every service prune them"),
         config: Path | None = ConfigOpt, url: str | None = UrlOpt) -> None:
    """Reconcile now (one service or all); --force retries a quarantined release; --prune-all lets a commit that
    removes every service prune them (refused otherwise: the empty desired state guard)."""
    data = _write("POST", config, url, "/sync", {"service": name, "force": force, "prune_all": prune_all}, "sync")
    typer.echo(f"revision {(data['revision'] or '?')[:12]}")
    for a in data["actions"]:
        typer.echo(f"{a['kind']:<9} {a['service']}@{a['host']}: {'; '.join(a['reasons'])}")


@app.command()
def audit(service: str | None = typer.Option(None, "--service", help="one service's jobs only"),
          since: str | None = typer.Option(None, "--since", help="30m, 2h, 7d, 1w, or an ISO date or time"),
          file: Path | None = typer.Option(None, "--file", help="read this audit.jsonl instead of asking the daemon"),
          as_json: bool = typer.Option(False, "--json"), config: Path | None = ConfigOpt,
          url: str | None = UrlOpt) -> None:
    """The audit trail: who deployed what, when, why, and how it ended (GET /audit, with the API token)."""
    from deployerd.audit import AuditRecord, parse_since, read_file, table

    try:
        when = parse_since(since) if since else None
    except ValueError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from e
    if file is not None:
        records, bad = read_file(file, service, when)
    else:
        settings = _settings(config)
        token = settings.secret("api_token")
        if token is None:
            typer.echo("no api_token_file configured: cannot authenticate to the daemon (or use --file)", err=True)
            raise typer.Exit(2)
        params = {k: v for k, v in (("service", service), ("since", when.isoformat() if when else None)) if v}
        data = _get(f"{_api(settings, url)}/audit", params, {"Authorization": f"Bearer {token}"})
        records = [AuditRecord.model_validate(r) for r in data["records"]]
        bad = data["unreadable_lines"]
    if as_json:
        typer.echo(json.dumps([r.model_dump() for r in records], indent=2))
    else:
        typer.echo(table(records), nl=False)
    if bad:
        typer.echo(f"({bad} unreadable lines skipped)", err=True)


@sandbox_app.command("up")
def sandbox_up(hosts: int = typer.Option(1, "--hosts", min=1, max=8), state_dir: Path | None = None,
               swarm: bool = typer.Option(False, "--swarm", help="form the hosts into a Docker Swarm (the first "
                                          "is the manager, running the cluster's image registry)")) -> None:
    """Start N test hosts (systemd + sshd + Docker each) and the embedded Registry."""
    from deployerd import sandbox

    _logging()
    info = sandbox.up(hosts, state_dir or sandbox.default_state_dir(), swarm)
    typer.echo(info.model_dump_json(indent=2))


@sandbox_app.command("down")
def sandbox_down(state_dir: Path | None = None) -> None:
    """Remove every container, volume and process the sandbox started, and nothing else."""
    from deployerd import sandbox

    _logging()
    sandbox.down(state_dir or sandbox.default_state_dir())


@sandbox_app.command("status")
def sandbox_status(state_dir: Path | None = None) -> None:
    from deployerd import sandbox

    typer.echo(sandbox.status(state_dir or sandbox.default_state_dir()).model_dump_json(indent=2))


@registry_app.command("serve")
def registry_serve(db: Path = typer.Option(Path("registry.db"), help="SQLite file"),
                   host: str = "127.0.0.1", port: int = 8000,
                   token_file: Path | None = typer.Option(None, help="bearer token for write routes")) -> None:
    """Serve the Registry contract (droplets + the five service endpoints), persisted in SQLite."""
    from deployerd.registry.server import read_token, serve

    serve(db, host=host, port=port, token=read_token(token_file))


@app.command()
def demo(down: bool = typer.Option(False, "--down", help="stop the demo daemon and its sandbox")) -> None:
    """The demo: a sandbox host, the embedded Registry, a git copy of desired_state/, and the daemon."""
    from deployerd import demo as demo_mod

    _logging()
    code = demo_mod.down() if down else demo_mod.up()
    raise typer.Exit(code)


def main() -> None:
    from deployerd.tree import TreeError

    try:
        app()
    except (ValueError, OSError, TreeError) as e:  # bad configuration or a missing file: one line, no traceback
        typer.echo(f"deployerd: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
