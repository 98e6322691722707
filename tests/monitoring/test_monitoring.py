"""The monitoring that ships: alert rules and their promtool tests, examples, dashboard.

promtool and amtool come from the Debian packages prometheus and
prometheus-alertmanager (tools/setup installs them); a missing one fails these tests.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from sovbackupd.config.models import Metrics as MetricsConfig
from sovbackupd.metrics import Metrics
from tests.conftest import RedisServer, Sandbox, require_tool
from tests.integration.test_daemon import (
    DaemonProcess,
    NotifySocket,
    daemon_policy,
    daily_far_away,
    has,
    hourly_far_away,
    rewrite,
    scrape_when_up,
)

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config" / "prometheus" / "sovbackupd-rules.yml"
PROMETHEUS_CONFIG = ROOT / "config" / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = ROOT / "config" / "alertmanager" / "alertmanager.yml"
DASHBOARD = ROOT / "config" / "grafana" / "sovbackupd-dashboard.json"
ALERTS_DOC = ROOT / "docs" / "alerts.md"
RULE_TESTS = sorted(Path(__file__).parent.glob("*.test.yml"))
RUNBOOKS = "https://github.com/sovereigncore/sovbackupd/blob/main/docs/alerts.md"
METRIC_NAME = re.compile(r"(?<![\w:])sovbackupd_[a-z_]+")
INTERVAL = "sovbackupd_tier_interval_seconds"
# Where each severity is routed by the example Alertmanager configuration.
RECEIVERS = {"critical": "backup-pager", "warning": "backup-team"}


def run_tool(tool: str, *arguments: str, cwd: Path = ROOT) -> str:
    """Run *tool* with *arguments*; fail with its output unless it exits 0."""
    completed = subprocess.run(
        [require_tool(tool), *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"{tool} {' '.join(arguments)} failed:\n{output}"
    return output


def alert_rules() -> list[dict[str, Any]]:
    """Return every alerting rule of the shipped rule file."""
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def metric_names(expressions: list[str]) -> set[str]:
    """Return the sovbackupd series names that PromQL *expressions* select."""
    return {name for expression in expressions for name in METRIC_NAME.findall(expression)}


def queryable_names(exposition: str) -> set[str]:
    """Return every series name Prometheus can query after scraping *exposition*.

    A family declared by ``# TYPE`` counts even without samples (a labelled metric whose
    labels are not known yet); a histogram is queried through its _bucket, _sum and
    _count series, never by its bare name.
    """
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {name, f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def github_anchor(heading: str) -> str:
    """Return the anchor GitHub gives a Markdown *heading*."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def heading_anchors(markdown: str) -> set[str]:
    """Return the anchors of the headings of *markdown*, outside code blocks."""
    anchors: set[str] = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif line.startswith("#") and not in_code:
            anchors.add(github_anchor(line.lstrip("#")))
    return anchors


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Yield every panel of a dashboard, the ones inside collapsed rows too."""
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_queries() -> list[str]:
    """Return the PromQL of every panel target and query variable of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"]
        for panel in dashboard_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


# 1. The rule file and its unit tests.


def test_rule_file_passes_promtool_check_rules() -> None:
    """The rule file passes promtool check rules: valid PromQL, templates, durations."""
    output = run_tool("promtool", "check", "rules", str(RULES))
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_rule_unit_tests_pass_promtool_test_rules() -> None:
    """Every promtool unit test of the alerts passes."""
    assert RULE_TESTS, "no promtool rule tests in tests/monitoring/"
    output = run_tool(
        "promtool", "test", "rules", *[path.name for path in RULE_TESTS], cwd=RULE_TESTS[0].parent
    )
    assert output.count("SUCCESS") == len(RULE_TESTS)


def test_every_alert_has_a_firing_and_a_quiet_promtool_case() -> None:
    """Each alert is shown firing at least once and staying quiet at least once."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        document = yaml.safe_load(path.read_text())
        assert [(path.parent / name).resolve() for name in document["rule_files"]] == [RULES]
        for test in document["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown quiet"
    assert (firing | quiet) - alerts == set(), "tests of alerts the rule file lacks"


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section() -> None:
    """Labels and annotations are complete, and each runbook_url names a heading of alerts.md."""
    headings = heading_anchors(ALERTS_DOC.read_text())
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in RECEIVERS, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert annotations["runbook_url"] == f"{RUNBOOKS}#{name.lower()}", name
        assert name.lower() in headings, f"docs/alerts.md has no section for {name}"


# 2. The example Prometheus and Alertmanager configurations.


def test_example_prometheus_config_passes_promtool_and_scrapes_the_default_endpoint() -> None:
    """The example passes promtool check config, loads the rules, scrapes the default listen."""
    output = run_tool("promtool", "check", "config", str(PROMETHEUS_CONFIG))
    assert f"SUCCESS: {len(alert_rules())} rules found" in output
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert [(PROMETHEUS_CONFIG.parent / name).resolve() for name in config["rule_files"]] == [RULES]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "sovbackupd"]
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    assert targets == [MetricsConfig().listen]
    assert config["alerting"]["alertmanagers"]


def test_example_alertmanager_config_passes_amtool_check_config() -> None:
    """The example alertmanager.yml passes amtool check-config."""
    output = run_tool("amtool", "check-config", str(ALERTMANAGER_CONFIG))
    assert "SUCCESS" in output


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: str(rule["alert"]))
def test_alertmanager_routes_each_alert_to_the_receiver_of_its_severity(
    rule: dict[str, Any],
) -> None:
    """Critical alerts reach the pager, warnings the team, by the example routing tree."""
    severity = rule["labels"]["severity"]
    run_tool(
        "amtool",
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER_CONFIG}",
        f"--verify.receivers={RECEIVERS[severity]}",
        f"alertname={rule['alert']}",
        f"severity={severity}",
        "instance=127.0.0.1:9877",
    )


# 3. The metrics the rules and the dashboard use are the ones the daemon exports.


def test_running_daemon_exports_every_metric_the_rules_and_dashboard_name(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """A real daemon's /metrics declares every sovbackupd series an alert or a panel queries."""
    policy, listen = daemon_policy(
        tmp_path, sandbox, redis_server, {"hourly": hourly_far_away(), "daily": daily_far_away()}
    )
    daemon = start_daemon(policy)
    daemon.wait_for_backups(1)  # the catch-up backup of a new server
    exported = queryable_names(scrape_when_up(listen).text)
    used = metric_names([rule["expr"] for rule in alert_rules()])
    assert {"sovbackupd_build_info", INTERVAL, "sovbackupd_backups_stored"} <= used
    assert used - exported == set(), "the alert rules query metrics the daemon does not export"
    assert metric_names(dashboard_queries()) - exported == set(), "the dashboard does too"


def test_daemon_exports_each_tier_interval_and_drops_a_tier_removed_by_reload(
    tmp_path: Path,
    sandbox: Sandbox,
    notify_socket: NotifySocket,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """The interval gauge follows the policy: set at start, updated and pruned on SIGHUP."""
    policy, listen = daemon_policy(
        tmp_path, sandbox, None, {"hourly": hourly_far_away(), "daily": daily_far_away()}
    )
    daemon = start_daemon(policy)
    ready, _ = notify_socket.wait_for(has("READY", "1"), "READY=1")  # metrics set before it
    started = scrape_when_up(listen)
    assert started.value(INTERVAL, tier="hourly") == 3600
    assert started.value(INTERVAL, tier="daily") == 86400

    rewrite(policy, tiers={"daily": {"schedule": "0 3 * * 0", "keep": 100}})
    daemon.send(signal.SIGHUP)
    notify_socket.wait_for(has("READY", "1"), "READY=1 after the reload", ready + 1)
    reloaded = scrape_when_up(listen)
    assert reloaded.labels(INTERVAL) == [{"tier": "daily"}]
    assert reloaded.value(INTERVAL, tier="daily") == 7 * 86400


# 4. The Grafana dashboard.


def test_dashboard_queries_name_only_metrics_the_daemon_exports() -> None:
    """Every panel and variable query names series of the metrics module's registry."""
    registry = CollectorRegistry()
    Metrics(registry)
    exported = queryable_names(generate_latest(registry).decode())
    used = metric_names(dashboard_queries())
    assert used, "the dashboard queries no sovbackupd metric"
    assert used - exported == set()


def test_dashboard_shows_every_metric_the_alerts_watch() -> None:
    """An operator paged by an alert finds the metrics behind it on the dashboard."""
    in_rules = metric_names([rule["expr"] for rule in alert_rules()])
    assert in_rules - metric_names(dashboard_queries()) == set()


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query, its variables filled in, parses as PromQL for promtool."""
    # Grafana's label_values(selector, label) asks Prometheus for the series of selector.
    selectors = [
        re.sub(r"^label_values\((.+),\s*\w+\)$", r"\1", query) for query in dashboard_queries()
    ]
    substituted = [query.replace("$instance", ".*") for query in selectors]
    assert not any("$" in query for query in substituted), "an unknown dashboard variable"
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{index}:check", "expr": query}
                    for index, query in enumerate(substituted)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    run_tool("promtool", "check", "rules", str(path))


def test_dashboard_panels_use_the_datasource_variable() -> None:
    """Every query panel reads from the ${DS_PROMETHEUS} variable, so it imports anywhere."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for panel in dashboard_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        sources = [panel["datasource"], *(target["datasource"] for target in panel["targets"])]
        assert all(source["uid"] == "${DS_PROMETHEUS}" for source in sources), panel["title"]
