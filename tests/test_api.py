"""The worker's HTTP API for models and their enrichments, as a client sees it."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest

from enricher import sample
from enricher.stream.topics import ensure_topics, read_topic
from enricher.supervise import WorkerProcess

TOKEN = "t0ken-for-tests"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def api(tmp_path_factory, broker):
    from enricher.broker import free_port
    from enricher.config import Settings

    tmp = tmp_path_factory.mktemp("api")
    settings = Settings.from_env(env={}, data_dir=str(tmp / "data"), broker=broker.url, http_port=free_port(),
                                 inference_topic="api-inferences", dlq_topic="api-dlq",
                                 control_topic="api-control", session_timeout=6.0, topic_partitions=1,
                                 api_token=TOKEN, reference_roots=str(tmp))
    ensure_topics(settings)
    reference = tmp / "reference.parquet"
    pq.write_table(sample.reference_table(500), reference)
    worker = WorkerProcess(settings, log_path=tmp / "worker.log", extra_env={"ENRICHER_API_TOKEN": TOKEN}).start()
    worker.wait_for(lambda s: s["uptime_s"] >= 0, timeout=60)
    yield worker, settings, str(reference)
    worker.stop()


def call(worker, method, path, body=None, token=TOKEN, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(worker.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_register_a_model_and_list_it(api):
    worker, _, reference = api
    body = {"schema": sample.SCHEMA, "reference": reference}
    assert call(worker, "PUT", "/models/api_one", body, token=None)[0] == 401
    assert call(worker, "PUT", "/models/api_one", body, token="wrong")[0] == 401
    status, doc = call(worker, "PUT", "/models/api_one", body)
    assert status == 201 and doc["model_id"] == "api_one" and doc["features"] == 11
    assert doc["enrichments"] == {"anomaly_detection": "disabled", "explainability": "disabled",
                                  "bias_mitigation": "disabled", "hotspots": "disabled"}
    assert call(worker, "PUT", "/models/api_one", body)[0] == 200  # replaced, not created
    # with a token configured, reads need it too
    assert call(worker, "GET", "/models", token=None)[0] == 401
    status, doc = call(worker, "GET", "/models")
    assert status == 200 and [m["model_id"] for m in doc["models"]] == ["api_one"]
    status, doc = call(worker, "GET", "/models/api_one")
    assert status == 200 and doc["schema"]["task"] == sample.SCHEMA["task"]
    # the registration wrote the reference's histograms (drift, dashboards) at once
    status, doc = call(worker, "POST", "/query", {"sql": "SELECT feature, sum(count) FROM enricher_store.reference_bins "
                                                        "FINAL WHERE model_id = 'api_one' GROUP BY feature ORDER BY feature"})
    assert status == 200 and doc["rows"] == [[f, 500] for f in sorted(sample.NUMERIC + ["region", "sex"])]


@pytest.mark.parametrize("path, body, field", [
    ("/models/api_bad", {"schema": {**sample.SCHEMA, "task": "astrology"}}, "schema.task"),
    ("/models/api_bad", {"schema": {**sample.SCHEMA, "positive_treshold": 0.3}, "reference": "x"},
     "schema.positive_treshold"),
    ("/models/api_bad", {"schema": sample.SCHEMA, "reference": "/nonexistent/ref.parquet"}, "reference"),
    ("/models/api_bad", {"schema": sample.SCHEMA}, "reference"),
    ("/models/api_bad", {"schema": sample.SCHEMA, "reference": "x", "colour": "red"}, "colour"),
    ("/models/Bad-Id", {"schema": sample.SCHEMA, "reference": "x"}, "model_id"),
])
def test_a_bad_registration_names_the_field_at_fault(api, path, body, field):
    worker, _, reference = api
    if body.get("reference") == "x":
        body = {**body, "reference": reference}
    status, doc = call(worker, "PUT", path, body)
    assert status == 400 and doc["field"] == field and doc["error"]


@pytest.mark.parametrize("body, field", [
    ({"telepathy": {"enabled": True}}, "telepathy"),
    ({"anomaly_detection": {"enabled": "yes"}}, "anomaly_detection.enabled"),
    ({"anomaly_detection": {"enabled": True, "config": {"n_estimators": -1}}},
     "anomaly_detection.config.n_estimators"),
    ({"anomaly_detection": {"enabled": True, "config": {"depth": 3}}}, "anomaly_detection.config"),
    ({"anomaly_detection": {"enable": True}}, "anomaly_detection.enable"),
    ({"anomaly_detection": True}, "anomaly_detection"),
    ({}, ""),
])
def test_a_bad_toggle_names_the_field_at_fault_and_changes_nothing(api, body, field):
    worker, _, reference = api
    call(worker, "PUT", "/models/api_two", {"schema": sample.SCHEMA, "reference": reference})
    before = call(worker, "GET", "/models/api_two/enrichments")[1]
    status, doc = call(worker, "PATCH", "/models/api_two/enrichments", body)
    assert status == 400 and doc["field"] == field and doc["error"]
    assert call(worker, "GET", "/models/api_two/enrichments")[1] == before


def test_toggles_change_the_status_and_are_announced_on_the_control_topic(api):
    worker, settings, reference = api
    call(worker, "PUT", "/models/api_three", {"schema": sample.SCHEMA, "reference": reference})
    body = {"anomaly_detection": {"enabled": True, "config": {"n_estimators": 30}}}
    assert call(worker, "PATCH", "/models/api_three/enrichments", body, token=None)[0] == 401
    status, doc = call(worker, "PATCH", "/models/api_three/enrichments", body)
    ad = doc["anomaly_detection"]
    assert status == 200 and ad["enabled"] and ad["status"] == "pending" and ad["version"] is None
    assert ad["config"]["n_estimators"] == 30 and ad["updated_at"]
    status, doc = call(worker, "PATCH", "/models/api_three/enrichments", {"anomaly_detection": {"enabled": False}})
    assert status == 200 and doc["anomaly_detection"]["status"] == "disabled"
    assert doc["anomaly_detection"]["config"]["n_estimators"] == 30  # kept for next time
    events = [json.loads(m.value()) for m in read_topic(settings, settings.control_topic, expected=100, timeout=5)]
    mine = [e for e in events if e["model_id"] == "api_three"]
    assert [e["event"] for e in mine] == ["model_registered", "enrichments_changed", "enrichments_changed"]
    assert mine[1]["enabled"] == ["anomaly_detection"] and mine[2]["disabled"] == ["anomaly_detection"]


def test_a_retrain_request_sends_enabled_enrichments_back_to_the_trigger_and_refuses_what_is_off(api):
    worker, settings, reference = api
    call(worker, "PUT", "/models/api_five", {"schema": sample.SCHEMA, "reference": reference})
    call(worker, "PATCH", "/models/api_five/enrichments", {"hotspots": {"enabled": True}})
    assert call(worker, "POST", "/models/api_five/enrichments/retrain", {}, token=None)[0] == 401
    status, doc = call(worker, "POST", "/models/api_five/enrichments/retrain", {"enrichments": ["hotspots"]})
    assert status == 200 and doc["hotspots"]["status"] == "pending"
    status, doc = call(worker, "POST", "/models/api_five/enrichments/retrain", {"enrichments": ["anomaly_detection"]})
    assert status == 400 and doc["field"] == "enrichments" and "is off" in doc["error"]
    status, doc = call(worker, "POST", "/models/api_five/enrichments/retrain", {"enrichments": "hotspots"})
    assert status == 400 and doc["field"] == "enrichments"
    assert call(worker, "POST", "/models/nosuch/enrichments/retrain", {})[0] == 404
    events = [json.loads(m.value()) for m in read_topic(settings, settings.control_topic, expected=100, timeout=5)]
    mine = [e for e in events if e["model_id"] == "api_five"]
    assert mine[-1]["event"] == "retrain_requested" and mine[-1]["enrichments"] == ["hotspots"]


def test_a_hotspots_step_the_worker_refuses_fails_for_good_and_with_the_token_it_trains(api):
    """The hotspots step reads labelled rows through the worker's /query: a wrong token is
    a permanent failure (exit 3, not retried: it will not change), named as such."""
    worker, settings, reference = api
    call(worker, "PUT", "/models/api_seven", {"schema": sample.SCHEMA, "reference": reference})

    def step(name, token):
        command = [sys.executable, "-m", "enricher.cli", "--data-dir", settings.data_dir, "pipeline", name,
                   "--model", "api_seven", "--run", "run-seven"] + (["--enrichment", "hotspots"] if name == "train"
                                                                     else [])
        return subprocess.run(command, env={**os.environ, "ENRICHER_API_TOKEN": token}, capture_output=True,
                              text=True, timeout=120)
    assert step("prepare", TOKEN).returncode == 0
    refused = step("train", "not-the-token")
    assert refused.returncode == 3, refused.stderr
    assert "labelled rows could not be read" in refused.stderr and "bearer token" in refused.stderr
    assert "not-the-token" not in refused.stderr
    trained = step("train", TOKEN)
    assert trained.returncode == 0, trained.stderr


def test_an_unknown_model_is_404_and_a_body_that_is_not_json_is_400(api):
    worker, _, _ = api
    status, doc = call(worker, "GET", "/models/nosuch/enrichments")
    assert status == 404 and doc["field"] == "model_id"
    status, doc = call(worker, "PATCH", "/models/nosuch/enrichments", raw=b"{not json")
    assert status == 400 and "JSON" in doc["error"]
