"""End to end: a worker streams with anomaly detection on; a PATCH turns explanations on;
the trigger trains the surrogate; the running worker adds attributions to every row, with
their artifact version, and every stored row's attributions add up to its output."""

import json
import time
import urllib.request

import pytest

from enricher import sample
from enricher.supervise import TriggerProcess, WorkerProcess

from .conftest import register_sample
from .test_stream import count_rows, produce, query

pytestmark = pytest.mark.timeout(300)
FEATURES = [f["name"] for f in sample.SCHEMA["features"]]


def api(worker, path, method="GET", body=None):
    req = urllib.request.Request(worker.url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_explanations_switched_on_reach_the_stream_without_a_restart(make_settings, tmp_path):
    settings = make_settings(topic_partitions=1)
    register_sample(settings, tmp_path)  # anomaly detection trained and on
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
    trigger = TriggerProcess(settings, log_path=tmp_path / "trigger.log").start()
    try:
        produce(settings, sample.inferences(2000, id_prefix="before")[0], batch="json")
        worker.wait_for(lambda s: s["enriched"] >= 2000, timeout=120)
        view = f"enricher.{sample.MODEL_ID}"
        _, rows = query(settings, f"SELECT count() FROM {view} WHERE explanation_f0 IS NULL "
                                  "AND explainability_version IS NULL")
        assert rows[0][0] == 2000  # the columns are there, NULL while it is off
        doc = api(worker, f"/models/{sample.MODEL_ID}/enrichments", "PATCH",
                  {"explainability": {"enabled": True, "config": {"n_estimators": 40}}})
        assert doc["explainability"]["status"] == "pending"
        deadline = time.monotonic() + 150
        while api(worker, f"/models/{sample.MODEL_ID}/enrichments")["explainability"]["status"] != "ready":
            assert time.monotonic() < deadline, "explainability never became ready"
            time.sleep(0.5)
        status = api(worker, f"/models/{sample.MODEL_ID}/enrichments")["explainability"]
        assert status["quality"]["metric"] == "r2" and status["quality"]["fidelity"] >= 0.9
        time.sleep(1.5)  # past the refresh interval: the worker has swapped the artifact in
        produce(settings, sample.inferences(3000, id_prefix="after", seed=5)[0], batch="json")
        worker.wait_for(lambda s: s["enriched"] >= 5000, timeout=120)
        assert count_rows(settings) == (5000, 5000)
        attribution_sum = " + ".join(f"explanation_{f}" for f in FEATURES)
        _, rows = query(settings, f"SELECT count(), countIf(explainability_version = {status['version']}), "
                                  f"max(abs({attribution_sum} + explanation_base_value - explanation_output)), "
                                  "countIf(anomaly_score IS NOT NULL) "
                                  f"FROM {view} WHERE inference_id LIKE 'after%'")
        count, versioned, worst, scored = rows[0]
        assert (count, versioned, scored) == (3000, 3000, 3000)
        assert worst < 1e-6  # additivity on every stored row
        # what the rows say drives the score: f0 and f3 (the sample model's), measured in SQL
        _, rows = query(settings, f"SELECT avg(abs(explanation_f0)) + avg(abs(explanation_f3)), "
                                  f"{' + '.join(f'avg(abs(explanation_{f}))' for f in FEATURES)} FROM {view} "
                                  "WHERE explanation_output IS NOT NULL")
        assert rows[0][0] / rows[0][1] >= 0.7
    finally:
        trigger.stop()
        worker.stop()
