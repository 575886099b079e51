"""The Grafana dashboard, built with grafana-foundation-sdk.

`python -m enricher.observe.dashboard` writes k8s/base/grafana/enricher-dashboard.json,
the one file docker/compose.yaml provisions and k8s/ carries as a ConfigMap
for Grafana's sidecar; tests/test_dashboard.py fails when that file is not
what this module builds, and runs every query of every panel against a real
Prometheus (scraping a worker and a trigger) and the ClickHouse engine.

Two data sources, both chosen with dashboard variables: Prometheus for what
the processes count (throughput, latency, lag, training...), ClickHouse for
what the enriched tables hold (anomaly rate, top anomalies, accuracy,
fairness, hotspots). `$model` selects the model; the ClickHouse panels read
the model's view `${database}.${model}` (a model id is an identifier the
registry validated, so it is a plain table name; give Grafana's ClickHouse
user `readonly=1`).
"""

from __future__ import annotations

import json
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog import variants
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableOption, VariableRefresh

OUTPUT = Path(__file__).resolve().parents[2] / "k8s" / "base" / "grafana" / "enricher-dashboard.json"
UID = "inference-enricher"
PROM = DataSourceRef(type_val="prometheus", uid="${prometheus}")
CLICKHOUSE_PLUGIN = "grafana-clickhouse-datasource"
CH = DataSourceRef(type_val=CLICKHOUSE_PLUGIN, uid="${clickhouse}")
TABLE = "${database}.${model}"  # the model's view: enriched rows with their labels

# -- the SQL of the ClickHouse panels (the README's *Queries for dashboards* are these, for credit_default) --
SQL = {
    "anomaly_rate": f"""SELECT $__timeInterval(timestamp) AS time, avg(anomaly_score > 0.7) AS anomaly_rate, count() AS inferences
FROM {TABLE}
WHERE $__timeFilter(timestamp) AND anomaly_score IS NOT NULL
GROUP BY time ORDER BY time""",
    "top_anomalies": f"""SELECT timestamp, inference_id, anomaly_score, prediction, label, anomaly_detection_version
FROM {TABLE}
WHERE $__timeFilter(timestamp)
ORDER BY anomaly_score DESC NULLS LAST LIMIT 20""",
    "accuracy": f"""SELECT $__timeInterval(timestamp) AS time, avg((prediction >= 0.5) = (label = 1)) AS accuracy,
       count() AS labelled
FROM {TABLE}
WHERE $__timeFilter(timestamp) AND label IN (0, 1)
GROUP BY time ORDER BY time""",
    "label_coverage": f"""SELECT $__timeInterval(timestamp) AS time, avg(label IS NOT NULL) AS labelled,
       avgIf(dateDiff('second', timestamp, label_at), label_at > timestamp) AS label_delay_seconds
FROM {TABLE}
WHERE $__timeFilter(timestamp)
GROUP BY time ORDER BY time""",
    "fairness": f"""SELECT time, max(tpr) - min(tpr) AS gap_raw, max(tpr_mitigated) - min(tpr_mitigated) AS gap_mitigated
FROM (SELECT $__timeInterval(timestamp) AS time, sex,
             avgIf(prediction >= 0.5, label = 1) AS tpr,
             avgIf(bias_mitigated_prediction = 1, label = 1 AND bias_mitigated_prediction IS NOT NULL)
               AS tpr_mitigated
      FROM {TABLE}
      WHERE $__timeFilter(timestamp) AND sex IS NOT NULL AND label IN (0, 1)
      GROUP BY time, sex)
GROUP BY time ORDER BY time""",
    "hotspots": f"""SELECT $__timeInterval(timestamp) AS time, countIf(hotspot_id IS NOT NULL) AS in_hotspots,
       count() AS inferences
FROM {TABLE}
WHERE $__timeFilter(timestamp)
GROUP BY time ORDER BY time""",
}


class ClickHouseQuery(variants.Dataquery):
    """A target of Grafana's ClickHouse data source (the SDK has no builder for this plugin)."""

    def __init__(self, sql: str, ref_id: str, fmt: int):
        self.sql, self.ref_id, self.fmt = sql, ref_id, fmt

    def to_json(self) -> dict:
        # format: 0 table, 1 time series (the plugin's numbering); queryType "sql": raw SQL as written
        return {"refId": self.ref_id, "datasource": CH, "editorType": "sql", "queryType": "sql",
                "format": self.fmt, "rawSql": self.sql}


class ClickHouse(Builder[ClickHouseQuery]):
    def __init__(self, sql: str, ref_id: str = "A", series: bool = True):
        self._internal = ClickHouseQuery(sql, ref_id, 1 if series else 0)

    def build(self) -> ClickHouseQuery:
        return self._internal


def prom(expr: str, legend: str, ref: str = "A", instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(PROM)
    return q.instant() if instant else q


def series(title: str, unit: str, *targets, description: str = "", w: int = 8, ds=PROM) -> timeseries.Panel:
    p = timeseries.Panel().title(title).unit(unit).datasource(ds).span(w).height(8).description(description)
    for t in targets:
        p = p.with_target(t)
    return p


def build() -> dict:
    m = 'model=~"$model"'
    d = (gd.Dashboard("Inference enricher").uid(UID).tags(["enricher", "ml-monitoring"]).refresh("30s")
         .time("now-6h", "now").timezone("browser").editable()
         .description("Enrichment workers and training (Prometheus) and the enriched tables (ClickHouse)"))
    d = d.with_variable(gd.DatasourceVariable("prometheus").label("Prometheus").type("prometheus"))
    d = d.with_variable(gd.DatasourceVariable("clickhouse").label("ClickHouse").type(CLICKHOUSE_PLUGIN))
    d = d.with_variable(gd.QueryVariable("model").label("Model").datasource(PROM)
                        .query("label_values(enricher_inferences_consumed_total, model)")
                        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).include_all(False).multi(False))
    d = d.with_variable(gd.CustomVariable("database").label("ClickHouse database").values("enricher")
                        .current(VariableOption(text="enricher", value="enricher", selected=True)))

    d = d.with_row(gd.Row("Stream"))
    d = d.with_panel(series(
        "Throughput", "rows/s",
        prom(f"sum by (model) (rate(enricher_inferences_enriched_total{{{m}}}[$__rate_interval]))", "{{model}}"),
        prom(f"sum(rate(enricher_inferences_consumed_total{{{m}}}[$__rate_interval]))", "consumed", "B"),
        description="Rows enriched and written to ClickHouse per second"))
    d = d.with_panel(series(
        "Dead letters by reason", "rows/s",
        prom('sum by (model, reason) (rate(enricher_inferences_dead_lettered_total{model=~"$model|"}'
             '[$__rate_interval]))', "{{model}} {{reason}}"),
        description="Rows sent to the dead-letter topic (model empty: no registered model named)"))
    d = d.with_panel(series(
        "End-to-end latency", "s",
        *[prom(f"histogram_quantile({q}, sum by (le) (rate(enricher_end_to_end_latency_seconds_bucket"
               f"[$__rate_interval])))", f"p{int(q * 100)}", ref)
          for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))],
        description="From an inference's timestamp to the insert of its enriched row"))
    d = d.with_panel(series(
        "Consumer lag by partition", "short",
        prom("sum by (topic, partition) (enricher_consumer_lag)", "{{topic}}/{{partition}}"),
        description="Messages not enriched yet: high watermark of the latest fetch minus the next offset"))
    d = d.with_panel(series(
        "Time per enrichment (p95 per batch)", "s",
        prom("histogram_quantile(0.95, sum by (le, enrichment) (rate(enricher_enrichment_seconds_bucket"
             "[$__rate_interval])))", "{{enrichment}}")))
    d = d.with_panel(series(
        "ClickHouse inserts", "s",
        prom("histogram_quantile(0.95, sum by (le) (rate(enricher_clickhouse_insert_seconds_bucket"
             "[$__rate_interval])))", "insert p95"),
        prom("sum(rate(enricher_clickhouse_insert_failures_total[$__rate_interval]))", "failures/s", "B")))
    d = d.with_panel(series(
        "Batch sizes", "short",
        prom("sum(rate(enricher_batch_rows_sum[$__rate_interval])) / sum(rate(enricher_batch_rows_count"
             "[$__rate_interval]))", "rows per batch"),
        prom("sum(rate(enricher_batch_messages_sum[$__rate_interval])) / sum(rate(enricher_batch_messages_count"
             "[$__rate_interval]))", "messages per batch", "B")))

    d = d.with_row(gd.Row("Artifacts and training"))
    d = d.with_panel(table.Panel().title("Artifact versions in service").datasource(PROM).span(8).height(8)
                     .with_target(prom(f"max by (model, enrichment) (enricher_artifact_version{{{m}}})",
                                       "{{enrichment}}", instant=True)))
    d = d.with_panel(series(
        "Artifact loads", "short",
        prom(f"sum by (enrichment, result) (increase(enricher_artifact_loads_total{{{m}}}[$__rate_interval]))",
             "{{enrichment}} {{result}}"),
        description="Versions loaded, and refused (integrity or loading failed; the old version keeps serving)"))
    d = d.with_panel(series(
        "Training runs", "short",
        prom(f"sum by (result) (increase(enricher_training_runs_total{{{m}}}[$__rate_interval]))", "{{result}}"),
        prom("sum(enricher_training_runs_running)", "running", "B"),
        prom("histogram_quantile(0.9, sum by (le) (rate(enricher_training_run_seconds_bucket[$__range])))",
             "p90 duration (s)", "C"),
        description="Runs the trigger submitted and followed to their end, by outcome"))

    d = d.with_row(gd.Row("Model quality"))
    d = d.with_panel(series(
        "Drift per feature (PSI)", "short",
        prom(f'max by (feature) (enricher_drift{{{m}, metric="psi"}})', "{{feature}}"),
        description="Population stability index of the drift window against the reference data"))
    d = d.with_panel(series(
        "Performance (last day)", "percentunit",
        prom(f'max by (metric) (enricher_performance{{{m}, metric=~"accuracy|roc_auc|r2|label_coverage"}})',
             "{{metric}}")))
    d = d.with_panel(series(
        "Fairness gap (last day)", "percentunit",
        prom(f'max by (attribute, constraint, decision) (enricher_fairness_gap{{{m}}})',
             "{{attribute}} {{constraint}} {{decision}}"),
        description="Largest difference between groups: raw decision and after bias mitigation"))

    d = d.with_row(gd.Row("Enriched rows (ClickHouse)"))
    d = d.with_panel(series("Anomaly rate", "percentunit", ClickHouse(SQL["anomaly_rate"]), ds=CH,
                            description="Share of rows with anomaly_score > 0.7"))
    d = d.with_panel(table.Panel().title("Top anomalies").datasource(CH).span(16).height(8)
                     .with_target(ClickHouse(SQL["top_anomalies"], series=False)))
    d = d.with_panel(series("Accuracy over time (labelled rows)", "percentunit", ClickHouse(SQL["accuracy"]), ds=CH))
    d = d.with_panel(series("Label coverage and delay", "percentunit", ClickHouse(SQL["label_coverage"]), ds=CH))
    d = d.with_panel(series("Equal-opportunity gap: raw and mitigated", "percentunit", ClickHouse(SQL["fairness"]),
                            ds=CH))
    d = d.with_panel(stat.Panel().title("Rows in hotspots").datasource(CH).span(8).height(8)
                     .with_target(ClickHouse(SQL["hotspots"])))
    return json.loads(json.dumps(d.build(), cls=JSONEncoder))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def targets(doc: dict) -> list[tuple[str, str, dict]]:
    """(panel title, data source type, target) for every query of every panel."""
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            ds = (target.get("datasource") or panel.get("datasource") or {}).get("type")
            out.append((panel["title"], ds, target))
    return out


if __name__ == "__main__":
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
