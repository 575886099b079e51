"""Training faults as a user meets them: the reference data gone or damaged,
a step that fails, one that hangs. The enrichment says failed, with the step
and the reason; the previous artifact keeps serving; the stream goes on."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest

from enricher import sample
from enricher.supervise import TriggerProcess, WorkerProcess

from .conftest import register_sample
from .test_stream import count_rows, produce, query

pytestmark = pytest.mark.timeout(300)


def api(worker, path, method="GET", body=None):
    req = urllib.request.Request(worker.url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def wait_state(worker, state, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = api(worker, f"/models/{sample.MODEL_ID}/enrichments")["anomaly_detection"]
        if doc["status"] == state:
            return doc
        time.sleep(0.3)
    raise TimeoutError(f"still {doc}")


@pytest.mark.slow  # a fault or soak test: `make test-slow` (CI runs it)
@pytest.mark.parametrize("damage", ["missing", "malformed"])
def test_damaged_reference_data_fails_the_run_and_the_previous_artifact_keeps_serving(make_settings, tmp_path,
                                                                                     damage):
    settings = make_settings(step_retries=2, topic_partitions=1)
    registry = register_sample(settings, tmp_path)  # v1 trained and published
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
    trigger = TriggerProcess(settings, log_path=tmp_path / "trigger.log").start()
    try:
        produce(settings, sample.inferences(1000, id_prefix="before")[0], batch="json")
        worker.wait_for(lambda s: s["enriched"] >= 1000, timeout=120)
        reference = registry.state.root / sample.MODEL_ID / "reference.parquet"
        if damage == "missing":
            reference.unlink()
        else:
            reference.write_bytes(b"PAR1 this is not parquet any more")
        # a new setting: the trigger runs the workflow again, and its first step meets the damage
        api(worker, f"/models/{sample.MODEL_ID}/enrichments", "PATCH",
            {"anomaly_detection": {"config": {"n_estimators": 50}}})
        produce(settings, sample.inferences(2000, id_prefix="during", seed=4)[0], batch="json")
        doc = wait_state(worker, "failed")
        assert doc["step"] == "prepare"
        assert ("missing" if damage == "missing" else "cannot be read") in doc["message"]
        assert "1 attempt(s)" in doc["message"], "a failure a retry cannot change is not retried"
        assert doc["version"] == 1, "the previous artifact still serves"
        produce(settings, sample.inferences(1000, id_prefix="after", seed=6)[0], batch="json")
        worker.wait_for(lambda s: s["enriched"] >= 4000, timeout=120)
    finally:
        trigger.stop()
        worker.stop(signal.SIGTERM)
    assert count_rows(settings) == (4000, 4000)
    _, rows = query(settings, f"SELECT anomaly_detection_version, count(), countIf(anomaly_score IS NULL) "
                              f"FROM enricher.{sample.MODEL_ID} GROUP BY 1")
    assert [tuple(r) for r in rows] == [(1, 4000, 0)], "every row scored, by v1, through the failed run"


@pytest.mark.slow  # a fault or soak test: `make test-slow` (CI runs it)
def test_a_training_step_past_its_deadline_fails_with_the_step_and_the_reason(make_settings, tmp_path):
    settings = make_settings(step_retries=0, step_deadline=8)  # prepare alone takes ~3 s (imports)
    register_sample(settings, tmp_path)
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
    trigger = TriggerProcess(settings, log_path=tmp_path / "trigger.log").start()
    try:
        worker.wait_for(lambda s: True, timeout=60)
        api(worker, f"/models/{sample.MODEL_ID}/enrichments", "PATCH",
            {"anomaly_detection": {"config": {"n_estimators": 5_000_000}}})
        produce(settings, sample.inferences(1000)[0], batch="json")
        doc = wait_state(worker, "failed", timeout=120)
        assert doc["step"] == "train-anomaly-detection" and "deadline of 8s" in doc["message"]
        assert doc["version"] == 1
        worker.wait_for(lambda s: s["enriched"] >= 1000, timeout=120)
    finally:
        trigger.stop()
        worker.stop()
    _, rows = query(settings, f"SELECT anomaly_detection_version, count() FROM enricher.{sample.MODEL_ID} GROUP BY 1")
    assert [tuple(r) for r in rows] == [(1, 1000)]
