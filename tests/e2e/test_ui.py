"""The status page in a real browser: Debian's chromium, headless, driven by Playwright (never its own browser).

One daemon runs its real loop on a real git repository and the sandbox's hosts: ``web`` serves on sbx-1, ``leak``
on sbx-2 echoes its secret and exits, so its first deploy fails with the echo in its log tail. The secrets come
from a real secrets file. The tests check that a commit appears on an open page without a reload, that the failed
deploy shows its log tail (the value as ***), and that no secret value is anywhere in any page's DOM or in the
event stream. Screenshots, light and dark, go to $DEPLOYERD_TEST_SCREENSHOTS (default: a pytest temp dir),
whose path is written to the test output. The time from a commit to the cell showing it is measured and
printed, not asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import yaml
from daemon_harness import Daemon, DesiredRepo, private_file, running_daemon, settings_for

from deployerd.events import ReconcileDone
from deployerd.sandbox import SandboxInfo
from deployerd.store import JobStatus

playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
WEB, LEAK = "web", "leak"
PORTS = {WEB: 8481, LEAK: 8482}
WAIT_MS = 180_000  # a deploy on a loaded machine; every wait is bounded


@dataclass
class UI:
    daemon: Daemon
    repo: DesiredRepo
    values: list[str]
    screenshots: Path
    browser: object
    stream_text: list[str] = field(default_factory=list)


async def _read_stream(url: str, out: list[str]) -> None:
    """Everything the event stream sends to a browser, kept to be searched for secret values."""
    async with httpx.AsyncClient(timeout=None) as client, client.stream("GET", url) as resp:
        async for chunk in resp.aiter_text():
            out.append(chunk)


async def _until_finished(d: Daemon, name: str, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        jobs = await d.jobs(name)
        if jobs and jobs[0].status.finished and not d.engine.queue.busy(name):
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no finished job of {name} within {limit_s:g} s")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ui(sandbox: SandboxInfo, tmp_path_factory: pytest.TempPathFactory,
             request: pytest.FixtureRequest) -> AsyncIterator[UI]:
    tmp = tmp_path_factory.mktemp("ui")
    shots = Path(os.environ.get("DEPLOYERD_TEST_SCREENSHOTS") or tmp_path_factory.mktemp("ui-screenshots"))
    await asyncio.to_thread(shots.mkdir, parents=True, exist_ok=True)
    web_key, leak_token = f"WebK{secrets.token_hex(12)}", f"LeakT{secrets.token_hex(12)}"
    repo = DesiredRepo(tmp / "repo", sandbox)
    repo.service(WEB, PORTS[WEB], host="sbx-1", secrets=["API_KEY"], env={"PLAIN": "not-secret"})
    repo.service(LEAK, PORTS[LEAK], host="sbx-2", secrets=["LEAK_TOKEN"], health_timeout_s=8,
                 docker={"restart": "no"},
                 dockerfile="FROM busybox:latest\nCOPY www /www\nCMD " + json.dumps(
                     ["busybox", "sh", "-c", 'echo "cannot connect with token $LEAK_TOKEN"; exit 3']) + "\n")
    repo.commit("two services: web and leak")
    secrets_file = private_file(tmp / "secrets.yaml", yaml.safe_dump(
        {"services": {WEB: {"API_KEY": web_key}, LEAK: {"LEAK_TOKEN": leak_token}}}))
    settings = settings_for(tmp, sandbox, repo, secrets_file=secrets_file)
    async with running_daemon(settings, loop=True) as d, playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        state = UI(daemon=d, repo=repo, values=[web_key, leak_token], screenshots=shots, browser=browser)
        readers = [asyncio.create_task(_read_stream(f"{d.url}/ui/events?view={v}", state.stream_text))
                   for v in ("overview", "hosts", f"service&name={LEAK}", f"service&name={WEB}")]
        try:
            await _until_finished(d, WEB)
            await _until_finished(d, LEAK)
            yield state
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await browser.close()
            _say(request, f"status page screenshots: {shots}")


def _say(request: pytest.FixtureRequest, line: str) -> None:
    """A line in the test output even under -q without -s (a measurement, where the screenshots are)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        print(f"\n{line}", flush=True)


async def _page(ui: UI, path: str, dark: bool = False, js: bool = True):  # type: ignore[no-untyped-def]
    context = await ui.browser.new_context(color_scheme="dark" if dark else "light",  # type: ignore[attr-defined]
                                           java_script_enabled=js, viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(ui.daemon.url + path)
    return context, page


async def _shot(ui: UI, page, name: str) -> None:  # type: ignore[no-untyped-def]
    await page.screenshot(path=str(ui.screenshots / f"{name}.png"), full_page=True)


async def test_a_commit_appears_on_the_open_page_without_a_reload(ui: UI, request: pytest.FixtureRequest) -> None:
    d = ui.daemon
    assert (await d.last_job(WEB)).status is JobStatus.SUCCEEDED
    context, page = await _page(ui, "/ui")
    try:
        cell = page.locator(f"#cell-{WEB}-sbx-1")
        await page.wait_for_selector("#live[data-state=live]", timeout=30_000)
        before = await cell.locator(".release-desired").inner_text()
        # a mark that a reload would wipe, and the moments the cell first shows the new desired release and commit
        await page.evaluate("""() => {
            window.noReload = true;
            window.seen = {};
            const cellText = () => (document.getElementById('cell-web-sbx-1') || {textContent: ''}).textContent;
            const look = () => {
                const el = document.querySelector('#cell-web-sbx-1 .release-desired');
                if (el && el.textContent !== window.before && !window.seen.desired) window.seen.desired = Date.now();
                if (window.needle && cellText().includes(window.needle) && !window.seen.running)
                    window.seen.running = Date.now();
            };
            new MutationObserver(look).observe(document.body, {subtree: true, childList: true, characterData: true});
        }""")
        await page.evaluate("b => { window.before = b; }", before)
        planned: list[float] = []  # when the daemon finished the first reconcile of the new commit

        def on_event(event: object) -> None:
            if isinstance(event, ReconcileDone) and event.revision == sha and not planned:
                planned.append(time.time() * 1000)

        unsubscribe = d.engine.events.subscribe(on_event)
        sha = ""
        message = f"web: v2 {secrets.token_hex(3)}"
        ui.repo.write(f"services/{WEB}/www/index.html", "<h1>web v2</h1>\n")
        sha = ui.repo.commit(message)
        committed_ms = time.time() * 1000
        await page.evaluate("n => { window.needle = n; }", sha[:8])
        await page.wait_for_function("() => window.seen.running", timeout=WAIT_MS)
        text = await cell.inner_text()
        assert sha[:8] in text and message in text and "deployerd tests" in text, text
        assert "Synced" in text and "Healthy" in text, text
        assert await page.evaluate("() => window.noReload === true"), "the page was reloaded"
        unsubscribe()
        seen = await page.evaluate("() => window.seen")
        await _shot(ui, page, "overview-light")
        _say(request, f"commit -> cell shows the new desired release: {(seen['desired'] - committed_ms) / 1000:.2f} s"
                      f" (commit -> reconcile done {(planned[0] - committed_ms) / 1000:.2f} s, reconcile done -> cell "
                      f"{(seen['desired'] - planned[0]) / 1000:.3f} s); commit -> cell shows the commit running: "
                      f"{(seen['running'] - committed_ms) / 1000:.2f} s (deploy included)")
        job = await d.last_job(WEB)
        _say(request, f"the deploy job itself took {job.duration_seconds} s; last reconcile "
                      f"{d.engine.last_reconcile.duration_s if d.engine.last_reconcile else '-'} s")
    finally:
        await context.close()
    # the same page without JavaScript: complete, only static
    context, page = await _page(ui, "/ui", js=False)
    try:
        text = await page.locator(f"#cell-{WEB}-sbx-1").inner_text()
        assert sha[:8] in text and message in text, text
        assert "reload to refresh" in await page.locator("#live").inner_text()
    finally:
        await context.close()


async def test_a_failed_deploy_shows_its_log_tail(ui: UI) -> None:
    job = await ui.daemon.last_job(LEAK)
    assert job.status is JobStatus.FAILED, (job.status, job.error)
    for dark in (False, True):
        context, page = await _page(ui, f"/ui/services/{LEAK}", dark=dark)
        try:
            record = page.locator(f"#job-{job.id}")
            tail = record.locator("pre.log-tail")
            await tail.wait_for(timeout=30_000)
            assert "cannot connect with token ***" in await tail.inner_text()
            assert "failed" in await record.locator("h3").inner_text()
            assert "Verify Health" in await record.locator("table.phases").inner_text()
            assert await page.locator("#service-plan li").count() >= 1  # the plan, with its reasons
            await _shot(ui, page, f"service-failed-{'dark' if dark else 'light'}")
        finally:
            await context.close()


async def test_pages_are_semantic_and_usable_by_keyboard(ui: UI) -> None:
    for path in ("/ui", "/ui/hosts", f"/ui/services/{WEB}"):
        context, page = await _page(ui, path, dark=path == "/ui/hosts")
        try:
            assert await page.locator("header").count() == 1 and await page.locator("main").count() == 1
            assert await page.locator("nav[aria-label]").count() >= 1 and await page.locator("footer").count() == 1
            assert await page.locator("h1").count() == 1
            assert await page.locator("thead th:not([scope=col])").count() == 0
            assert await page.locator("tbody th:not([scope=row])").count() == 0
            await page.keyboard.press("Tab")
            assert await page.evaluate("() => document.activeElement.textContent") == "Skip to content"
            await page.keyboard.press("Enter")
            assert await page.evaluate("() => document.activeElement.id") == "main"
            name = path.strip("/").replace("/", "-")
            await _shot(ui, page, f"{name}-{'dark' if path == '/ui/hosts' else 'light'}")
        finally:
            await context.close()
    context, page = await _page(ui, "/ui", dark=True)
    try:
        await _shot(ui, page, "overview-dark")
        hosts_text = await (await context.new_page()).goto(ui.daemon.url + "/ui/hosts")
        assert hosts_text is not None and hosts_text.ok
    finally:
        await context.close()


async def test_no_secret_value_in_any_page_or_the_event_stream(ui: UI) -> None:
    texts = []
    for path in ("/ui", "/ui/hosts", f"/ui/services/{WEB}", f"/ui/services/{LEAK}"):
        context, page = await _page(ui, path)
        try:
            await page.wait_for_selector("#live[data-state=live]", timeout=30_000)
            texts.append(await page.evaluate("() => document.documentElement.outerHTML"))
        finally:
            await context.close()
    stream = "".join(ui.stream_text)
    assert "event: main" in stream and "cell-web-sbx-1" in stream  # the stream was read, with pages in it
    assert "token ***" in "".join(texts)  # the log tail is there, redacted
    for value in ui.values:
        for text in texts:
            assert value not in text
        assert value not in stream


async def test_the_api_docs_render_in_a_browser_from_the_daemon_alone(ui: UI) -> None:
    """Swagger UI at /docs draws every operation of the OpenAPI spec, with every file it loads served by the
    daemon itself: a user behind a closed network gets working docs (a CDN would leave a blank page)."""
    spec = (await ui.daemon.http.get("/openapi.json")).json()
    operations = sum(len(methods) for methods in spec["paths"].values())
    context, page = await _page(ui, "/docs")
    origins: set[str] = set()
    page.on("request", lambda req: origins.add(req.url.split("/", 3)[2] if "://" in req.url else req.url))
    try:
        await page.reload()
        await page.wait_for_selector(".opblock", timeout=30_000)
        assert await page.locator(".opblock").count() == operations
        # every operation sits under a named section, none under Swagger's catch-all "default"
        assert "default" not in await page.locator(".opblock-tag").all_inner_texts()
        assert await page.locator(".info .title").inner_text() != ""
        assert await page.locator("button.authorize").count() == 1  # the bearer scheme can be entered
        await _shot(ui, page, "api-docs-light")
        assert origins == {ui.daemon.url.split("/", 3)[2]}, origins
    finally:
        await context.close()
