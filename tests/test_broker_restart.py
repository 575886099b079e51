"""The broker stops and comes back (Tansu keeping its log in S3: moto's
server on loopback), while a worker runs: the worker reconnects without a
restart, and nothing committed is lost or shows twice in the view."""

from __future__ import annotations

import time

import boto3
import pytest

from enricher import sample
from enricher.broker import EmbeddedBroker, free_port
from enricher.config import Settings
from enricher.supervise import WorkerProcess

from .conftest import register_sample
from .test_stream import count_rows, produce, query

pytestmark = pytest.mark.timeout(400)


@pytest.fixture
def s3_broker(tmp_path):
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="test",
                 aws_secret_access_key="test", region_name="us-east-1").create_bucket(Bucket="tansu")
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true"}
    broker = EmbeddedBroker(port=free_port(), storage="s3://tansu/", env=env)
    broker.start(log_file=open(tmp_path / "broker.log", "ab"))
    yield broker
    broker.stop()
    moto.stop()


@pytest.mark.slow  # a fault or soak test: `make test-slow` (CI runs it)
def test_a_broker_restart_mid_stream_loses_nothing_and_reads_nothing_committed_again(s3_broker, tmp_path):
    settings = Settings.from_env(env={}, data_dir=str(tmp_path / "data"), broker=s3_broker.url,
                                 http_port=free_port(), session_timeout=6.0, topic_partitions=2,
                                 batch_size=500, max_message_bytes=1 << 20, refresh_interval=0.5)
    register_sample(settings, tmp_path)
    produce(settings, sample.inferences(3000, id_prefix="before")[0], batch="json")
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
    try:
        worker.wait_for(lambda s: s["enriched"] >= 3000, timeout=180)
        time.sleep(4)  # a commit interval: the offsets of "before" are committed
        s3_broker.stop()
        time.sleep(5)  # the worker sees the broker gone
        assert worker.process.poll() is None
        s3_broker.start(log_file=open(tmp_path / "broker.log", "ab"))
        produce(settings, sample.inferences(3000, id_prefix="after", seed=5)[0], batch="json")
        worker.wait_for(lambda s: count_rows(settings)[1] >= 6000, timeout=240, interval=1.0)
    finally:
        worker.stop()
    assert count_rows(settings) == (6000, 6000)
    _, rows = query(settings, f"SELECT countIf(startsWith(inference_id, 'before')), "
                              f"countIf(startsWith(inference_id, 'after')) FROM enricher.{sample.MODEL_ID}")
    assert tuple(rows[0]) == (3000, 3000)
    # what had been committed was not read again: the "before" rows were stored once
    _, stored = query(settings, "SELECT count() FROM enricher_store.enriched "
                                "WHERE startsWith(inference_id, 'before')")
    assert stored[0][0] == 3000
