"""monitoring/: the alert rules pass ``promtool check rules`` and their unit tests (``promtool test rules``, one
test at least per alert), and every rule and dashboard expression parses and names only metrics the daemon
exports (read from its /metrics output), and that output passes ``promtool check metrics``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deployerd.connection import HostStats
from deployerd.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
MON = ROOT / "monitoring"
RULES = MON / "deployerd.rules.yml"
RULE_TESTS = MON / "tests" / "deployerd.rules.test.yml"
DASHBOARD = MON / "grafana-dashboard.json"
# Grafana's own variables, as Grafana would expand them for a 6-hour view
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "6h", "$__interval": "15s"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan", "le"}

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool missing (apt: prometheus; `make deps`)")


def run_promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    assert promtool is not None
    return subprocess.run([promtool, *args], input=stdin.decode() if stdin else None, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def exported_names(text: str) -> set[str]:
    """Every series name a /metrics text can carry, from its ``# TYPE`` lines (present even for a labelled
    metric that has no series yet)."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "counter":
            names.add(name if name.endswith("_total") else f"{name}_total")
        else:
            names.add(name)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, label matchers, ranges, groupings, functions
    and keywords removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", expr):
        if m.group(2) or m.group(1).lower() in PROMQL_WORDS:
            continue  # a function call or a keyword
        names.add(m.group(1))
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(r.get("alert") or r["record"], r["expr"]) for g in groups for r in g["rules"]]


def live_metrics_text() -> str:
    """What /metrics serves (the route returns ``Metrics.render()``), with a series in most families (every
    family has its # TYPE line, series or not)."""
    m = Metrics()
    m.watch_hosts(lambda: {"web-1": HostStats(connects=1, commands=2)})
    m.reconciles.labels(result="ok").inc()
    m.reconcile_duration.observe(0.3)
    m.jobs.labels(kind="deploy", status="succeeded").inc()
    m.phase_duration.labels(phase="Build", method="docker").observe(2)
    m.rollbacks.labels(service="web", reason="Verify Health", result="restored").inc()
    m.job_duration.labels(kind="deploy", status="succeeded").observe(4)
    m.host_up.labels(host="web-1").set(1)
    m.host_locks.labels(event="acquired").inc()
    m.notifications.labels(destination="gh", kind="github", result="sent").inc()
    m.reconcile_interval.set(60)
    return m.render().decode()


@needs_promtool
def test_rules_check_and_their_unit_tests_pass() -> None:
    checked = run_promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run_promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_unit_test() -> None:
    alerts = {name for name, _ in rule_exprs()}
    assert {"DeployerdRollback", "DeployerdServiceNotConverged", "DeployerdHostDown", "DeployerdReconcileStalled",
            "DeployerdGitFetchFailing", "DeployerdNotificationsFailing"} <= alerts
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert alerts <= tested, f"alerts with no test that expects them to fire: {sorted(alerts - tested)}"


@needs_promtool
def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    # promtool parses an expression as the expr of a recording rule
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = run_promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in checked.stdout


@needs_promtool
def test_a_broken_expression_is_caught(tmp_path: Path) -> None:
    """The parse check above can fail: promtool refuses a malformed expression."""
    path = tmp_path / "bad.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": "sum by (le (rate(deployerd_reconcile_total[1m]))"}]}]}))
    assert run_promtool("check", "rules", str(path)).returncode != 0


def test_dashboard_and_rules_name_only_exported_metrics() -> None:
    exported = exported_names(live_metrics_text())
    assert "deployerd_notifications_total" in exported and "deployerd_rollbacks_total" in exported
    used: dict[str, set[str]] = {}
    for where, expr in dashboard_exprs() + rule_exprs():
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        for name in names:
            used.setdefault(name, set()).add(where)
    unknown = {n: sorted(w) for n, w in used.items() if n not in exported}
    assert not unknown, f"names the daemon does not export: {unknown}"
    dash = json.loads(DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for wanted in ("reconcile duration", "deploy duration", "outcomes", "rollbacks", "round trips", "hosts up"):
        assert wanted in titles, wanted


def test_metric_name_extraction() -> None:
    assert metric_names('sum by (le, phase) (rate(a_bucket{x="y(z)"}[5m])) / on(host) b offset 5m') == {
        "a_bucket", "b"}
    assert metric_names("time() - c > 3 * d") == {"c", "d"}
    assert metric_names('count(x) or vector(0)') == {"x"}


@needs_promtool
def test_metrics_output_passes_promtool_check_metrics() -> None:
    text = live_metrics_text()
    assert "_created" not in text
    checked = run_promtool("check", "metrics", stdin=text.encode())
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked.stdout + checked.stderr
