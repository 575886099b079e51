"""The dashboard and the alert rules: committed as built, every alert checked and unit-tested by promtool."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from enricher.observe import alerts, dashboard

ROOT = Path(__file__).resolve().parent.parent
ALERT_TESTS = ROOT / "tests" / "prometheus" / "alerts.test.yaml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: `make test` installs Debian's prometheus package")
    return found


def test_the_committed_dashboard_is_what_the_builder_builds():
    assert dashboard.OUTPUT.read_text() == dashboard.render(), \
        "k8s/base/grafana/enricher-dashboard.json is stale: run python -m enricher.observe.dashboard"


def test_the_dashboard_has_a_model_selector_and_every_panel_a_query_of_its_data_source():
    doc = dashboard.build()
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["model"]["query"] == "label_values(enricher_inferences_consumed_total, model)"
    assert {variables[n]["query"] for n in ("prometheus", "clickhouse")} == {"prometheus", dashboard.CLICKHOUSE_PLUGIN}
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    assert len(panels) >= 18 and all(p.get("targets") for p in panels)
    titles = {p["title"] for p in panels}
    for wanted in ("Throughput", "Dead letters by reason", "End-to-end latency", "Consumer lag by partition",
                   "Time per enrichment (p95 per batch)", "ClickHouse inserts", "Batch sizes",
                   "Artifact versions in service", "Training runs", "Drift per feature (PSI)", "Anomaly rate",
                   "Top anomalies", "Accuracy over time (labelled rows)", "Label coverage and delay",
                   "Equal-opportunity gap: raw and mitigated", "Rows in hotspots", "Fairness gap (last day)"):
        assert wanted in titles
    for title, ds, target in dashboard.targets(doc):
        if ds == "prometheus":
            assert target["expr"] and "rawSql" not in target, title
        else:
            assert ds == dashboard.CLICKHOUSE_PLUGIN and target["rawSql"].count("${database}.${model}") >= 1, title
    # refIds are unique within a panel (Grafana drops a target whose refId repeats)
    for p in panels:
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_the_readme_shows_each_clickhouse_panel_query_for_the_sample_model():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Queries for dashboards", 1)[1].split("\n## ", 1)[0]
    shown = re.findall(r"```sql\n(.*?)```", section, re.S)
    for name, sql in dashboard.SQL.items():
        assert sql.replace("${database}.${model}", "enricher.credit_default") + "\n" in shown, name


def test_the_prometheus_rule_carries_the_rule_file():
    assert alerts.OUTPUT.read_text() == alerts.render(), \
        "k8s/base/prometheusrule.yaml is stale: run python -m enricher.observe.alerts"
    rule = yaml.safe_load(alerts.OUTPUT.read_text())
    assert rule["spec"]["groups"] == yaml.safe_load(alerts.RULES.read_text())["groups"]


def test_every_alert_passes_promtool_check_and_has_a_unit_test_that_passes():
    check = subprocess.run([promtool(), "check", "rules", str(alerts.RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    names = {r["alert"] for g in yaml.safe_load(alerts.RULES.read_text())["groups"] for r in g["rules"]}
    assert names == {"EnricherDeadLettersRising", "EnricherLatencyHigh", "EnricherLagGrowing", "EnricherNoData",
                     "EnricherTrainingFailing", "EnricherArtifactRefused"}
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    for name in names:  # each fires in its test, and is checked quiet before it should fire
        cases = [c for t in tests for c in t.get("alert_rule_test", []) if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in cases) and any(not c["exp_alerts"] for c in cases), name
    run = subprocess.run([promtool(), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_broken_alert_fails_its_unit_test(tmp_path):
    """The unit tests can fail: the same tests against a rule file whose lag alert never fires."""
    broken = alerts.RULES.read_text().replace("enricher_consumer_lag) > 10000", "enricher_consumer_lag) > 1e12")
    (tmp_path / "k8s" / "base" / "prometheus").mkdir(parents=True)
    (tmp_path / "k8s" / "base" / "prometheus" / "alerts.yaml").write_text(broken)
    (tmp_path / "tests" / "prometheus").mkdir(parents=True)
    (tmp_path / "tests" / "prometheus" / "alerts.test.yaml").write_text(ALERT_TESTS.read_text())
    run = subprocess.run([promtool(), "test", "rules", str(tmp_path / "tests" / "prometheus" / "alerts.test.yaml")],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "EnricherLagGrowing" in run.stdout + run.stderr
