"""The README's dashboard queries run against the engine, as Grafana's ClickHouse data source sends them."""

import re
import time
from pathlib import Path

import orjson
import pytest
from enricher.models.artifact import ArtifactStore

from enricher import sample
from enricher.config import Settings
from enricher.store.drift import Drift
from enricher.store.labels import LabelSweep
from enricher.store.queries import QueryRunner
from enricher.store.reports import REPORTS, ReportStore
from enricher.store.sink import ClickHouseSink
from enricher.stream.batch import BatchProcessor, Messages
from enricher.stream.serving import Serving
from tests.conftest import register_sample

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


ONE_BUCKET = 10**9  # seconds: the next boundary after 2001 is in 2033


def dashboard_queries() -> list[str]:
    section = README.split("## Queries for dashboards", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, re.S)


def expand(sql: str, start: float, end: float, interval_s: int = 60) -> str:
    """What the Grafana ClickHouse plugin makes of its macros."""
    sql = re.sub(r"\$__timeFilter\((\w+)\)",
                 lambda m: f"{m.group(1)} >= toDateTime({int(start)}) AND {m.group(1)} <= toDateTime({int(end)})", sql)
    return re.sub(r"\$__timeInterval\((\w+)\)",
                  lambda m: f"toStartOfInterval(toDateTime({m.group(1)}), INTERVAL {interval_s} second)", sql)


@pytest.fixture
def populated(tmp_path):
    """A trained model's store: 3,000 scored inferences over the last 50 minutes, 1,000 of them labelled later."""
    settings = Settings.from_env(env={}, data_dir=str(tmp_path / "data"), broker="kafka://127.0.0.1:1")
    registry = register_sample(settings, tmp_path, rows=3000)
    processor = BatchProcessor(settings, Serving(registry, ArtifactStore(settings.artifact_dir)),
                               ClickHouseSink(settings))
    now_ms = int(time.time() * 1000)
    messages, planted = sample.inferences(3000, anomalies=10)
    spread = []
    for i, m in enumerate(messages):  # one a second, over the last 50 minutes
        doc = orjson.loads(m)
        doc["timestamp"] = now_ms - (3000 - i) * 1000
        spread.append(orjson.dumps(doc))
    messages = spread
    processor.handle(Messages(messages, [0] * 3000, list(range(3000))))
    labels = [orjson.dumps({"model_id": sample.MODEL_ID, "inference_id": f"inf-{i:07d}", "label": (i // 6) % 2})
              for i in range(0, 3000, 3)]
    processor.handle(Messages(labels, [0] * len(labels), list(range(3000, 3000 + len(labels)))))
    LabelSweep(processor.sink.tables).run()
    drift = Drift(processor.sink.tables, registry, bins=settings.drift_bins)
    yield settings, planted, drift, now_ms / 1000
    processor.sink.tables.client.close()


def test_the_readme_has_the_seven_dashboard_queries():
    queries = dashboard_queries()
    assert len(queries) == 7
    assert all("$__timeFilter(timestamp)" in q for q in queries)


def test_each_dashboard_query_answers_what_its_panel_shows(populated):
    settings, planted, drift, now = populated
    runner = QueryRunner(settings)
    start, end = now - 3600, now
    # (the worker's drift export writes the reference histograms; here the first measure does)
    expected = drift.measure(sample.MODEL_ID, end - start, feature="f0", end=end).features[0].psi
    try:
        rate, top, psi, accuracy, coverage, _, hotspots = [(a.columns, a.rows) for a in (runner.run(expand(q, start, end))
                                                                               for q in dashboard_queries())]
        # the fairness panel over one bucket holding the whole range (buckets align to the epoch)
        fairness_panel = runner.run(expand(dashboard_queries()[5], start, end, interval_s=ONE_BUCKET))
        reports = ReportStore(settings, drift.registry)
        performance = reports.run(REPORTS["performance"], sample.MODEL_ID, "1h", end)
        fairness = reports.run(REPORTS["fairness"], sample.MODEL_ID, "1h", end)
        reports.close()
    finally:
        runner.close()
    columns, rows = rate
    assert columns == ["time", "anomaly_rate", "inferences"] and 45 <= len(rows) <= 52
    assert sum(r[2] for r in rows) == 3000 and all(0 <= r[1] <= 1 for r in rows)
    columns, rows = top
    assert len(rows) == 20 and planted <= {r[1] for r in rows}, "the planted anomalies are at the top"
    assert [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)
    columns, rows = psi
    assert columns == ["psi"] and abs(rows[0][0] - expected) < 1e-9
    columns, rows = accuracy  # the panel's points add up to the performance report's figure
    assert columns == ["time", "accuracy", "labelled"] and sum(r[2] for r in rows) == performance["labelled"] == 1000
    assert abs(sum(r[1] * r[2] for r in rows) / 1000 - performance["metrics"]["accuracy"]) < 1e-9
    columns, rows = coverage
    assert columns == ["time", "labelled", "label_delay_seconds"]
    labelled = sum(r[1] for r in rows) / len(rows)
    assert 0.30 < labelled < 0.37 and all(r[2] is None or r[2] >= 0 for r in rows)
    columns, rows = hotspots  # no hotspots trained here: every row outside
    assert columns == ["time", "in_hotspots", "inferences"] and sum(r[2] for r in rows) == 3000
    assert sum(r[1] for r in rows) == 0
    columns, rows = fairness_panel.columns, fairness_panel.rows  # the panel's gap is the report's
    [sex] = fairness["attributes"]
    assert columns == ["time", "gap_raw", "gap_mitigated"] and len(rows) == 1
    assert abs(rows[0][1] - sex["gaps"]["raw"]["equal_opportunity"]) < 1e-9 and rows[0][1] > 0
