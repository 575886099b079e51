"""End to end: a worker is streaming; a PATCH turns anomaly detection on; the
trigger runs the training workflow (local runner); the worker starts adding
scores without a restart, and nothing is lost or doubled across the swap."""

import json
import threading
import time
import urllib.request

import pyarrow.parquet as pq
import pytest

from enricher import sample
from enricher.store.query import query
from enricher.stream.producer import InferenceProducer
from enricher.stream.topics import ensure_topics
from enricher.supervise import TriggerProcess, WorkerProcess

pytestmark = pytest.mark.timeout(400)
TOKEN = "s3cret-token"


def call(url, method, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, json.loads(resp.read())


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
