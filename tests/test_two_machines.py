"""Two workers on two "machines" (two data directories), one broker, one object store
(S3, moto's server), one ClickHouse over HTTP, and the registry in ClickHouse
(ENRICHER_CONTROL_STORE=clickhouse): a model registered through one worker's API and
switched on through the other's is trained by a trigger on a third machine (its local
runner's steps read and write only ClickHouse and the object store), both workers serve
it from one consumer group, and every row is written once between them."""

import json
import time
import urllib.request

import pyarrow.parquet as pq
import pytest

from enricher import sample
from enricher.stream.producer import InferenceProducer
from enricher.stream.topics import ensure_topics
from enricher.supervise import TriggerProcess, WorkerProcess

from .clickhouse_http import ClickHouseHTTP

pytestmark = pytest.mark.timeout(400)


def call(url, method="GET", body=None):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def test_two_workers_without_a_shared_volume_serve_the_same_models_and_write_every_row_once(
        make_settings, tmp_path, s3):
    server = ClickHouseHTTP(tmp_path / "clickhouse").start()
    # (moto keeps one store per process: a prefix of this test's own)
    objects = s3.replace("/enricher?", "/two-machines?")
    shared = dict(clickhouse_url=server.url(), control_store="clickhouse", artifact_store_url=objects,
                  topic_partitions=4, refresh_interval=0.5)
    first = make_settings(data_dir=str(tmp_path / "machine-a"), **shared)
    same_stream = dict(inference_topic=first.inference_topic, dlq_topic=first.dlq_topic,
                       consumer_group=first.consumer_group)
    second = make_settings(data_dir=str(tmp_path / "machine-b"), **shared, **same_stream)
    third = make_settings(data_dir=str(tmp_path / "machine-c"), **shared, **same_stream)
    ensure_topics(first)
    reference = tmp_path / "reference.parquet"
    pq.write_table(sample.reference_table(3000), reference)
    a = WorkerProcess(first, log_path=tmp_path / "a.log").start()
    b = WorkerProcess(second, log_path=tmp_path / "b.log").start()
    trigger = TriggerProcess(third, log_path=tmp_path / "trigger.log").start()
    try:
        for w in (a, b):
            w.wait_for(lambda s: s["uptime_s"] >= 0, timeout=60)
        call(f"{a.url}/models/{sample.MODEL_ID}", "PUT", {"schema": sample.SCHEMA, "reference": str(reference)})
        assert [m["model_id"] for m in call(f"{b.url}/models")["models"]] == [sample.MODEL_ID]  # B sees A's registration
        call(f"{b.url}/models/{sample.MODEL_ID}/enrichments", "PATCH", {"anomaly_detection": {"enabled": True}})
        deadline = time.time() + 180
        while time.time() < deadline:
            state = call(f"{a.url}/models/{sample.MODEL_ID}/enrichments")["anomaly_detection"]
            if state["status"] in ("ready", "failed"):
                break
            time.sleep(0.5)
        assert state["status"] == "ready", (state, (tmp_path / "trigger.log").read_text()[-3000:])
        messages, planted = sample.inferences(6000, anomalies=6)
        producer = InferenceProducer(first, batch="json", batch_rows=100)
        producer.send_many(messages)  # 60 messages, each on a random partition: both workers get some
        producer.flush()
        deadline = time.time() + 120
        while time.time() < deadline and a.status()["enriched"] + b.status()["enriched"] < 6000:
            time.sleep(0.5)
        shares = (a.status()["enriched"], b.status()["enriched"])
        assert sum(shares) == 6000 and min(shares) > 0, shares  # one group, split between the two
        from enricher.store.query import query

        _, rows = query(third, f"SELECT count(), uniqExact(inference_id), countIf(anomaly_score IS NULL), "
                               f"groupUniqArray(anomaly_detection_version) FROM enricher.{sample.MODEL_ID}")
        assert tuple(rows[0]) == (6000, 6000, 0, [1])
        _, top = query(third, f"SELECT inference_id FROM enricher.{sample.MODEL_ID} "
                              f"ORDER BY anomaly_score DESC LIMIT 6")
        assert {r[0] for r in top} == planted
        # no machine kept a registry of its own
        for machine in ("machine-a", "machine-b", "machine-c"):
            assert not (tmp_path / machine / "registry").exists(), machine
    finally:
        trigger.stop()
        for w in (a, b):
            w.stop()
        server.stop()
