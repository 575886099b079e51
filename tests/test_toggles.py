"""End to end: a worker is streaming; a PATCH turns anomaly detection on; the
trigger runs the training workflow (local runner); the worker starts adding
scores without a restart, and nothing is lost or doubled across the swap."""

import json
import math
import threading
import time
import urllib.request

import pyarrow.parquet as pq
import pytest

from enricher import sample
from enricher.observe import dashboard
from enricher.store.query import query
from enricher.stream.producer import InferenceProducer
from enricher.stream.topics import ensure_topics
from enricher.supervise import TriggerProcess, WorkerProcess
from tests.conftest import promql_range
from tests.test_dashboards import ONE_BUCKET, dashboard_queries, expand
from tests.test_stream import produce

pytestmark = pytest.mark.timeout(400)
TOKEN = "s3cret-token"


def call(url, method, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, json.loads(resp.read())


def get(url):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_a_toggle_trains_and_the_running_worker_starts_scoring_without_losing_a_row(make_settings, tmp_path):
    # A long refresh interval: the worker must learn of the new artifact from its announcement.
    settings = make_settings(batch_size=500, batch_timeout=0.1, refresh_interval=300, api_token=TOKEN)
    ensure_topics(settings)
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log", extra_env={"ENRICHER_API_TOKEN": TOKEN})
    worker.start()
    trigger = TriggerProcess(settings, log_path=tmp_path / "trigger.log").start()
    try:
        worker.wait_for(lambda s: s["uptime_s"] >= 0, timeout=60)
        reference = tmp_path / "reference.parquet"
        pq.write_table(sample.reference_table(5000), reference)
        status, _ = call(f"{worker.url}/models/{sample.MODEL_ID}", "PUT",
                         {"schema": sample.SCHEMA, "reference": str(reference)})
        assert status == 201

        total, chunk = 40_000, 500
        messages, _ = sample.inferences(total)
        sent = threading.Event()

        def stream():  # one inference per message, ~60 s of steady traffic
            producer = InferenceProducer(settings, batch="none")
            for start in range(0, total, chunk):
                producer.send_many(messages[start:start + chunk])
                producer.flush()
                time.sleep(0.75)
            sent.set()

        sender = threading.Thread(target=stream)
        sender.start()
        worker.wait_for(lambda s: s["enriched"] >= 2000, timeout=120)
        patched_at = time.time()
        status, doc = call(f"{worker.url}/models/{sample.MODEL_ID}/enrichments", "PATCH",
                           {"anomaly_detection": {"enabled": True, "config": {"n_estimators": 50}}})
        assert status == 200 and doc["anomaly_detection"]["status"] == "pending"

        def scored():
            _, rows = query(settings, f"SELECT count() FROM enricher.{sample.MODEL_ID} WHERE anomaly_score IS NOT NULL")
            return rows[0][0]

        deadline = time.time() + 120
        while scored() == 0 and time.time() < deadline:
            time.sleep(0.5)
        first_scored = time.time() - patched_at
        assert scored() > 0, "no row was scored after the toggle"
        assert sender.is_alive() or sent.is_set()
        sender.join()
        worker.wait_for(lambda s: s["consumed"] >= total, timeout=180)

        _, rows = query(settings, f"SELECT count(), uniqExact(inference_id), countIf(anomaly_score IS NULL), "
                                  f"groupUniqArray(anomaly_detection_version) FROM enricher.{sample.MODEL_ID}")
        count, unique, unscored, versions = rows[0]
        assert (count, unique) == (total, total), "every row once across the swap"
        assert 0 < unscored < total and sorted(v for v in versions if v is not None) == [1]
        # Once scoring began, every later row is scored: the swap happened between batches, for good.
        _, rows = query(settings, f"SELECT countIf(anomaly_score IS NULL) FROM enricher.{sample.MODEL_ID} "
                                  f"WHERE _ingested_at > (SELECT min(_ingested_at) FROM enricher.{sample.MODEL_ID} "
                                  f"WHERE anomaly_score IS NOT NULL)")
        assert rows[0][0] == 0
        _, doc = call(f"{worker.url}/models/{sample.MODEL_ID}/enrichments", "PATCH",
                      {"anomaly_detection": {"enabled": False}})
        assert doc["anomaly_detection"]["status"] == "disabled" and doc["anomaly_detection"]["version"] == 1
        assert doc["anomaly_detection"]["workflow"].startswith("enrich-credit-default-")

        # Off: the next rows carry NULL again, at once.
        late, _ = sample.inferences(1000, id_prefix="late")
        producer = InferenceProducer(settings, batch="none")
        producer.send_many(late)
        producer.flush()
        worker.wait_for(lambda s: s["consumed"] >= total + 1000, timeout=120)
        _, rows = query(settings, f"SELECT count(), countIf(anomaly_score IS NULL) FROM enricher.{sample.MODEL_ID} "
                                  f"WHERE startsWith(inference_id, 'late')")
        assert tuple(rows[0]) == (1000, 1000)
        assert "refreshed on an announcement" in (tmp_path / "worker.log").read_text()
        print(f"first scored row {first_scored:.1f}s after the PATCH")
    finally:
        trigger.stop()
        worker.stop()


def test_one_patch_turns_bias_mitigation_and_hotspots_on_and_their_columns_appear_with_versions(
        make_settings, tmp_path, prometheus):
    """Also the dashboard, proven here: a real Prometheus scrapes this worker and trigger while the
    stream is enriched and the workflow runs; every panel's query returns data."""
    settings = make_settings(batch_size=500, batch_timeout=0.1, refresh_interval=300, api_token=TOKEN,
                             label_sweep_interval=0.5, drift_interval=1.0)
    ensure_topics(settings)
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log", extra_env={"ENRICHER_API_TOKEN": TOKEN})
    worker.start()
    # The hotspots step reads the stream's labelled rows through the worker's /query: the
    # trigger (and so its runs) holds the token, as a deployment's Secret gives it.
    trigger = TriggerProcess(settings, log_path=tmp_path / "trigger.log",
                             extra_env={"ENRICHER_API_TOKEN": TOKEN}).start()
    try:
        worker.wait_for(lambda s: s["uptime_s"] >= 0, timeout=60)
        started = time.time()
        prom = prometheus(f"127.0.0.1:{settings.http_port}", f"127.0.0.1:{settings.trigger_metrics_port}")
        reference = tmp_path / "reference.parquet"
        pq.write_table(sample.reference_table(10_000), reference)
        call(f"{worker.url}/models/{sample.MODEL_ID}", "PUT", {"schema": sample.SCHEMA, "reference": str(reference)})
        status, doc = call(f"{worker.url}/models/{sample.MODEL_ID}/enrichments", "PATCH",
                           {"anomaly_detection": {"enabled": True}, "bias_mitigation": {"enabled": True},
                            "hotspots": {"enabled": True}})
        assert status == 200 and {doc[n]["status"] for n in ("bias_mitigation", "hotspots")} == {"pending"}
        deadline = time.time() + 180
        while time.time() < deadline:
            states = get(f"{worker.url}/models/{sample.MODEL_ID}/enrichments")
            if all(states[n]["status"] in ("ready", "failed") for n in ("bias_mitigation", "hotspots")):
                break
            time.sleep(0.5)
        assert [states[n]["status"] for n in ("bias_mitigation", "hotspots")] == ["ready", "ready"], states
        assert states["bias_mitigation"]["workflow"] == states["hotspots"]["workflow"]  # one run for both
        labels: list[bytes] = []
        messages, _ = sample.inferences(4000, id_prefix="both", labels=labels)
        producer = InferenceProducer(settings, batch="json", batch_rows=500)
        producer.send_many(messages)
        producer.flush()
        bad = [m for m, _ in sample.malformed(max_bytes=settings.max_message_bytes)]
        produce(settings, bad)
        worker.wait_for(lambda s: s["enriched"] >= 4000 and s["dead_lettered"] >= len(bad), timeout=120)
        producer.send_many(labels)  # late labels
        producer.flush()
        _, rows = query(settings, f"SELECT count(), countIf(bias_mitigated_prediction IN (0, 1)), "
                                  f"groupUniqArray(bias_mitigation_version), countIf(hotspot_id IS NOT NULL), "
                                  f"groupUniqArray(hotspots_version), groupUniqArray(hotspot_id) "
                                  f"FROM enricher.{sample.MODEL_ID}")
        count, decided, bias_versions, in_hotspot, hotspot_versions, ids = rows[0]
        assert (count, decided, bias_versions, hotspot_versions) == (4000, 4000, [1], [1])
        assert in_hotspot > 0 and "h1" in ids
        deadline = time.time() + 60
        while time.time() < deadline and query(settings, f"SELECT countIf(label IS NOT NULL) FROM "
                                                         f"enricher.{sample.MODEL_ID}")[1][0][0] < 4000:
            time.sleep(0.5)
        from enricher.store.query import report

        fair = report(settings, "fairness", sample.MODEL_ID, "1h")
        gaps = fair["attributes"][0]["gaps"]  # the sample scores f lower than m at equal merit
        assert gaps["mitigated"]["equal_opportunity"] < gaps["raw"]["equal_opportunity"] / 2, gaps
        # the README's fairness panel, over one bucket as wide as the report's hour, shows both gaps
        now = time.time()
        columns, panel = query(settings, expand(dashboard_queries()[5], now - 3600, now, interval_s=ONE_BUCKET))
        assert columns == ["time", "gap_raw", "gap_mitigated"] and len(panel) == 1
        assert abs(panel[0][1] - gaps["raw"]["equal_opportunity"]) < 1e-9
        assert abs(panel[0][2] - gaps["mitigated"]["equal_opportunity"]) < 1e-9
        spots = report(settings, "hotspots", sample.MODEL_ID, "1h")
        assert sum(h["rows"] for h in spots["hotspots"]) == in_hotspot
        assert {h["id"] for h in spots["hotspots"] if h["rows"]} == set(ids) - {None}
        # the sample's planted region among them, and the model as wrong there in the stream
        south = next(h for h in spots["hotspots"] if "region IN ('south')" in h["rules"])
        assert south["rows"] and south["labelled"] == south["rows"] and south["accuracy"] < 0.4, spots
        empty = panels_without_data(prom, settings, started)
        assert not empty, f"dashboard panels with no data: {empty}"
    finally:
        trigger.stop()
        worker.stop()


def panels_without_data(prom: str, settings, since: float, patience: float = 90) -> list:
    """Every query of every panel of the committed dashboard, as Grafana would send it for the
    sample model: PromQL as a range query over the test's time (a finite point somewhere), SQL
    through the worker's /query (at least one row). What stays empty after `patience` s is returned."""
    doc = json.loads(dashboard.OUTPUT.read_text())
    grafana = {"$model": sample.MODEL_ID, "$__rate_interval": "15s", "$__range": "1h"}
    deadline = time.time() + patience
    while True:
        empty = []
        for title, ds, target in dashboard.targets(doc):
            if ds == "prometheus":
                expr = target["expr"]
                for name, value in grafana.items():
                    expr = expr.replace(name, value)
                points = [float(v) for series in promql_range(prom, expr, since, time.time())
                          for _, v in series["values"]]
                if not any(math.isfinite(v) for v in points):
                    empty.append((title, expr))
            else:
                now = time.time()
                sql = target["rawSql"].replace("${database}", "enricher").replace("${model}", sample.MODEL_ID)
                if not query(settings, expand(sql, now - 3600, now))[1]:
                    empty.append((title, sql))
        if not empty or time.time() > deadline:
            return empty
        time.sleep(2)
