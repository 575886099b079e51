"""End to end: Tansu broker -> Faust worker -> chDB, as a user runs it."""

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from enricher import sample
from enricher.store.query import query
from enricher.stream import deadletters
from enricher.stream.producer import InferenceProducer
from enricher.stream.topics import ensure_topics
from enricher.supervise import WorkerProcess

from .conftest import register_sample

pytestmark = pytest.mark.timeout(300)


def produce(settings, messages, batch="none"):
    ensure_topics(settings)
    producer = InferenceProducer(settings, batch=batch)
    producer.send_many(messages)
    producer.flush()


def count_rows(settings, model_id=sample.MODEL_ID):
    _, rows = query(settings, f"SELECT count(), uniqExact(inference_id) FROM enricher.{model_id}")
    return tuple(rows[0])


@pytest.fixture
def worker_for(tmp_path):
    started = []

    def start(settings, name="worker"):
        w = WorkerProcess(settings, log_path=tmp_path / f"{name}.log").start()
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop(signal.SIGKILL if w.process.poll() is None else signal.SIGTERM, timeout=5)


def test_valid_rows_land_once_and_malformed_ones_in_the_dead_letter_topic(settings, tmp_path, worker_for):
    register_sample(settings, tmp_path)
    valid, planted = sample.inferences(6000, anomalies=6)
    bad = sample.malformed(max_bytes=settings.max_message_bytes)
    messages = valid[:3000] + [m for m, _ in bad] + valid[3000:]
    produce(settings, messages)

    worker = worker_for(settings)
    worker.wait_for(lambda s: s["consumed"] >= len(messages), timeout=120)

    # While the worker holds the embedded store, `enricher query` goes through it.
    cli = subprocess.run([sys.executable, "-m", "enricher.cli", "query", "--format", "json",
                          f"SELECT count() AS n, countIf(anomaly_score IS NULL) AS nulls FROM enricher.{sample.MODEL_ID}"],
                         env={**__import__("os").environ, **settings.to_env()}, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == [{"n": 6000, "nulls": 0}]

    metrics = worker.metrics()
    assert 'enricher_inferences_enriched_total{model="credit_default"} 6000.0' in metrics
    # of the malformed sample, 6 name the model, 1 names an unregistered one, 6 name none usable:
    # unregistered ids count under "" (no Prometheus series per id a producer makes up)
    assert 'enricher_inferences_consumed_total{model="credit_default"} 6006.0' in metrics
    assert 'enricher_inferences_consumed_total{model=""} 7.0' in metrics
    assert 'no_such_model' not in metrics
    assert 'enricher_inferences_dead_lettered_total{model="credit_default",reason="non_finite"} 1.0' in metrics
    assert 'enricher_end_to_end_latency_seconds_count 6000.0' in metrics
    assert "enricher_clickhouse_insert_seconds_count" in metrics and "enricher_batch_rows_bucket" in metrics
    worker.stop()

    assert count_rows(settings) == (6000, 6000)
    _, rows = query(settings, f"SELECT anomaly_detection_version, min(anomaly_score) > 0, max(anomaly_score) < 1 "
                              f"FROM enricher.{sample.MODEL_ID} GROUP BY 1")
    assert [tuple(r) for r in rows] == [(1, True, True)], "every row carries the artifact version that scored it"
    _, top = query(settings, f"SELECT inference_id FROM enricher.{sample.MODEL_ID} ORDER BY anomaly_score DESC LIMIT 6")
    assert {r[0] for r in top} == planted

    records = deadletters.read(settings, expected=len(bad))
    assert Counter(r.reason for r in records) == Counter(reason for _, reason in bad)
    assert sorted(r.value for r in records) == sorted(m for m, _ in bad), "the original bytes, untouched"
    by_reason = {r.reason: r for r in records}
    assert by_reason["unknown_model"].model_id == "no_such_model"
    assert by_reason["wrong_feature_type"].model_id == sample.MODEL_ID
    assert "f1" in by_reason["wrong_feature_type"].detail
    assert by_reason["invalid_json"].source.startswith(settings.inference_topic + "/")

    # ... and as a user reads them: `enricher deadletters`, filtered
    def cli_letters(*argv):
        done = subprocess.run([sys.executable, "-m", "enricher.cli", "deadletters", *argv],
                              env={**__import__("os").environ, **settings.to_env()}, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done

    every = json.loads(cli_letters("--format", "json").stdout)
    assert sorted(d["reason"] for d in every) == sorted(reason for _, reason in bad)
    assert all(d["source"].startswith(settings.inference_topic + "/") and d["timestamp"] for d in every)
    [unknown] = [json.loads(line) for line in cli_letters("--reason", "unknown_model", "--format", "jsonl").stdout.splitlines()]
    assert unknown["model_id"] == "no_such_model" and unknown["value"] == by_reason["unknown_model"].value.decode()
    ours = cli_letters("--model", sample.MODEL_ID, "--since", "1h")
    lines = ours.stdout.splitlines()
    assert len(lines) == sum(1 for r in records if r.model_id == sample.MODEL_ID) == 6
    assert all(line.split("\t")[2] == sample.MODEL_ID for line in lines)
    assert "wrong_feature_type" in ours.stdout and f"6 dead letter(s) (model {sample.MODEL_ID} in the last 1h)" in ours.stderr


def test_models_without_a_trained_artifact_get_null_never_a_made_up_score(settings, tmp_path, worker_for):
    register_sample(settings, tmp_path, model_id="not_trained", enable=True, trained=False)
    register_sample(settings, tmp_path, model_id="switched_off", enable=False, trained=False)
    messages = sample.inferences(500, model_id="not_trained")[0] + sample.inferences(500, model_id="switched_off")[0]
    produce(settings, messages)
    worker = worker_for(settings)
    worker.wait_for(lambda s: s["consumed"] >= 1000, timeout=120)
    worker.stop()
    for model_id in ("not_trained", "switched_off"):
        _, rows = query(settings, f"SELECT count(), countIf(anomaly_score IS NULL), "
                                  f"countIf(anomaly_detection_version IS NULL) FROM enricher.{model_id}")
        assert tuple(rows[0]) == (500, 500, 500)


@pytest.mark.slow  # a fault or soak test: `make test-slow` (CI runs it)
def test_a_worker_killed_mid_stream_loses_nothing_and_its_view_shows_each_once(make_settings, tmp_path, worker_for):
    settings = make_settings(batch_size=500, batch_timeout=0.05)
    register_sample(settings, tmp_path)
    total = 40_000
    messages, _ = sample.inferences(total)
    produce(settings, messages)

    first = worker_for(settings, "first")
    at_kill = first.wait_for(lambda s: s["consumed"] >= 8000, timeout=120, interval=0.05)
    first.stop(signal.SIGKILL)
    assert at_kill["consumed"] < total, "the kill must land mid-stream"

    second = worker_for(settings, "second")
    # The restarted worker reads from the last committed offsets until the table holds everything.
    second.wait_for(lambda s: count_rows(settings)[1] >= total, timeout=180, interval=0.5)
    second.stop()

    assert count_rows(settings) == (total, total)
    _, rows = query(settings, f"SELECT min(inference_id), max(inference_id) FROM enricher.{sample.MODEL_ID}")
    assert tuple(rows[0]) == ("inf-0000000", f"inf-{total - 1:07d}")


def test_a_redelivered_stream_shows_each_inference_once(make_settings, tmp_path, worker_for):
    settings = make_settings()
    register_sample(settings, tmp_path)
    messages, _ = sample.inferences(3000)
    produce(settings, messages)
    first = worker_for(settings, "first")
    first.wait_for(lambda s: s["consumed"] >= 3000, timeout=120)
    first.stop()
    # A new consumer group reads the whole topic again: every row is written a second time.
    again = make_settings(data_dir=str(settings.data_dir), inference_topic=settings.inference_topic,
                          dlq_topic=settings.dlq_topic, consumer_group=settings.consumer_group + "-again")
    second = worker_for(again, "second")
    second.wait_for(lambda s: s["consumed"] >= 3000, timeout=120)
    second.stop()
    assert count_rows(settings) == (3000, 3000)
    _, stored = query(settings, f"SELECT count() FROM enricher_store.enriched WHERE model_id = '{sample.MODEL_ID}'")
    assert stored[0][0] >= 3000  # copies may sit in storage until merged; the view hides them


def test_the_same_worker_writes_to_a_clickhouse_server_over_http(make_settings, tmp_path, worker_for):
    from .clickhouse_http import ClickHouseHTTP

    server = ClickHouseHTTP(tmp_path / "server", user="enricher", password="s3cret").start()
    try:
        settings = make_settings(clickhouse_url=server.url("analytics"))
        assert settings.clickhouse_database == "analytics"
        register_sample(settings, tmp_path)
        messages, planted = sample.inferences(5000, anomalies=5)
        produce(settings, messages + [b"{not json"])
        worker = worker_for(settings)
        worker.wait_for(lambda s: s["consumed"] >= 5001, timeout=120)
        # `enricher query` talks to the server directly, with the worker still running.
        _, rows = query(settings, f"SELECT count(), uniqExact(inference_id), countIf(anomaly_score IS NULL) "
                                  f"FROM analytics.{sample.MODEL_ID}")
        assert tuple(rows[0]) == (5000, 5000, 0)
        assert server.inserted_rows == 5000
        _, top = query(settings, f"SELECT inference_id FROM analytics.{sample.MODEL_ID} "
                                 f"ORDER BY anomaly_score DESC LIMIT 5")
        assert {r[0] for r in top} == planted
        assert "s3cret" not in (tmp_path / "worker.log").read_text()
        worker.stop()
    finally:
        server.stop()


def test_while_clickhouse_is_down_nothing_is_committed_and_nothing_lost(make_settings, tmp_path, worker_for):
    from .clickhouse_http import ClickHouseHTTP

    server = ClickHouseHTTP(tmp_path / "server").start()
    port = server.port
    settings = make_settings(clickhouse_url=server.url())
    register_sample(settings, tmp_path)
    produce(settings, sample.inferences(1000, id_prefix="before")[0])
    worker = worker_for(settings)
    worker.wait_for(lambda s: s["enriched"] >= 1000, timeout=120)
    server.stop()  # ClickHouse goes away

    produce(settings, sample.inferences(2000, id_prefix="during")[0])
    worker.wait_for(lambda s: "enricher_clickhouse_insert_failures_total 0.0" not in worker.metrics(), timeout=60)
    status = worker.status()
    assert status["enriched"] == 1000, "no batch counts as done while its insert fails"

    server = ClickHouseHTTP(tmp_path / "server", port=port).start()  # back, same address and data
    try:
        worker.wait_for(lambda s: s["enriched"] >= 3000, timeout=120)
        _, rows = query(settings, f"SELECT countIf(startsWith(inference_id, 'before')), "
                                  f"countIf(startsWith(inference_id, 'during')), count() FROM enricher.{sample.MODEL_ID}")
        assert tuple(rows[0]) == (1000, 2000, 3000)
        worker.stop()
    finally:
        server.stop()


def test_a_worker_stopped_while_its_batch_cannot_be_written_commits_none_of_it(make_settings, tmp_path,
                                                                             worker_for):
    # Faust acknowledges a take's events when the agent stops, written or not.
    from .clickhouse_http import ClickHouseHTTP

    server = ClickHouseHTTP(tmp_path / "server").start()
    port = server.port
    settings = make_settings(clickhouse_url=server.url(), topic_partitions=1)
    register_sample(settings, tmp_path)
    produce(settings, sample.inferences(1000, id_prefix="before")[0])
    worker = worker_for(settings, "first")
    worker.wait_for(lambda s: s["enriched"] >= 1000, timeout=120)
    deadline = time.monotonic() + 30
    while committed_offsets(settings) != [1000] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert committed_offsets(settings) == [1000]
    server.stop()

    produce(settings, sample.inferences(2000, id_prefix="during")[0])
    worker.wait_for(lambda s: "enricher_clickhouse_insert_failures_total 0.0" not in worker.metrics(), timeout=60)
    worker.stop()  # a clean stop, mid-retry
    assert committed_offsets(settings) == [1000]

    server = ClickHouseHTTP(tmp_path / "server", port=port).start()
    try:
        again = worker_for(settings, "second")
        again.wait_for(lambda s: s["enriched"] >= 2000, timeout=120)
        assert count_rows(settings) == (3000, 3000)
        again.stop()
    finally:
        server.stop()


@pytest.mark.parametrize("batch", ["json", "arrow"])
def test_batched_messages_are_enriched_row_by_row(make_settings, tmp_path, worker_for, batch):
    settings = make_settings(max_message_bytes=1 << 20)
    register_sample(settings, tmp_path)
    valid, planted = sample.inferences(5000, anomalies=5)
    bad = json.loads(valid[10])
    bad["features"]["f3"] = None  # one bad row inside a batch
    ensure_topics(settings)
    producer = InferenceProducer(settings, batch=batch, batch_rows=500)
    producer.send_many(valid[:10] + [json.dumps(bad).encode()] + valid[11:])
    producer.flush()
    assert producer.messages == 10

    worker = worker_for(settings)
    worker.wait_for(lambda s: s["enriched"] + s["dead_lettered"] >= 5000, timeout=120)
    worker.stop()
    assert count_rows(settings) == (4999, 4999)
    [record] = deadletters.read(settings, expected=1)
    assert (record.reason, record.batch_index) == ("missing_feature", 10)
    _, top = query(settings, f"SELECT inference_id FROM enricher.{sample.MODEL_ID} ORDER BY anomaly_score DESC LIMIT 5")
    assert {r[0] for r in top} == planted


def committed_offsets(settings) -> list[int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**settings.kafka_config(), "group.id": settings.consumer_group,
                         "enable.auto.commit": False})
    try:
        parts = [TopicPartition(settings.inference_topic, p) for p in range(settings.topic_partitions)]
        return [tp.offset for tp in consumer.committed(parts, timeout=10)]
    finally:
        consumer.close()


@pytest.mark.slow  # a fault or soak test: `make test-slow` (CI runs it)
def test_a_rebalance_mid_stream_loses_nothing_shows_each_once_and_commits_to_the_end(make_settings, tmp_path,
                                                                                 worker_for):
    # Two workers of one group sharing one ClickHouse (over HTTP: chDB is one
    # process's). The second joining and then the first leaving are two
    # rebalances: partitions are revoked, the flow suspended and resumed, the
    # fetcher paused; chunks taken before a rebalance are written but not acknowledged.
    from .clickhouse_http import ClickHouseHTTP

    server = ClickHouseHTTP(tmp_path / "server").start()
    try:
        settings = make_settings(clickhouse_url=server.url(), topic_partitions=4, batch_size=500,
                                 batch_timeout=0.05)
        register_sample(settings, tmp_path)
        total, chunk = 30_000, 750
        messages, _ = sample.inferences(total)
        ensure_topics(settings)

        def trickle():  # the stream keeps flowing through both rebalances (~20 s)
            producer = InferenceProducer(settings, batch="none")
            for start in range(0, total, chunk):
                producer.send_many(messages[start:start + chunk])
                producer.flush()
                time.sleep(0.5)

        sender = threading.Thread(target=trickle)
        sender.start()
        first = worker_for(settings, "first")
        first.wait_for(lambda s: s["consumed"] >= 1500, timeout=120, interval=0.05)
        second_settings = make_settings(clickhouse_url=server.url(), topic_partitions=4, batch_size=500,
                                        batch_timeout=0.05, data_dir=str(settings.data_dir),
                                        inference_topic=settings.inference_topic, dlq_topic=settings.dlq_topic,
                                        consumer_group=settings.consumer_group)
        second = worker_for(second_settings, "second")
        second.wait_for(lambda s: s["consumed"] > 0, timeout=120)  # it was given partitions: a rebalance
        assert sender.is_alive(), "the second worker must join mid-stream"
        first.stop()  # leaves the group: another rebalance, its partitions move to the second
        sender.join()
        second.wait_for(lambda s: count_rows(settings)[1] >= total, timeout=180, interval=0.5)
        assert "enricher_rebalance_seconds_count" in second.metrics()

        assert count_rows(settings) == (total, total)
        # Commits still follow the stream: each partition's committed offset is
        # one past the last offset stored from it (the rows say which; Tansu's
        # high watermark lags the last record batch, so it is not used).
        _, stored = query(settings, "SELECT _partition, max(_offset) + 1, uniqExact(_offset) "
                                    "FROM enricher_store.enriched GROUP BY _partition ORDER BY _partition")
        ends = [row[1] for row in stored]
        assert [row[2] for row in stored] == ends and sum(ends) == total  # offsets dense: every message stored
        deadline = time.monotonic() + 60
        while (committed := committed_offsets(settings)) != ends and time.monotonic() < deadline:
            time.sleep(1)
        assert committed == ends
        second.stop()
    finally:
        server.stop()


def test_a_row_from_the_future_is_dead_lettered_by_the_worker_with_its_reason(make_settings, tmp_path, worker_for):
    settings = make_settings(max_future_skew=120)
    register_sample(settings, tmp_path)
    now = int(time.time() * 1000)
    messages, _ = sample.inferences(50, start_ms=now - 60_000)
    ahead = json.loads(messages[0])
    ahead.update(inference_id="from-2031", timestamp=now + 5 * 365 * 86_400_000)
    ensure_topics(settings)
    # A user watching the dead letters as they come: `enricher deadletters --follow`
    follower = subprocess.Popen([sys.executable, "-m", "enricher.cli", "deadletters", "--follow", "--format", "jsonl"],
                                env={**__import__("os").environ, **settings.to_env()}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        produce(settings, messages + [json.dumps(ahead).encode()])
        worker = worker_for(settings)
        worker.wait_for(lambda s: s["consumed"] >= 51, timeout=120)
        worker.stop()
        assert count_rows(settings) == (50, 50)
        [dead] = deadletters.read(settings, expected=1)
        assert dead.reason == "future_timestamp" and dead.value == json.dumps(ahead).encode()
        assert "ENRICHER_MAX_FUTURE_SKEW allows (120 s)" in dead.detail
        seen = json.loads(follower.stdout.readline())  # arrived while it was following
        assert seen["reason"] == "future_timestamp" and seen["value"] == json.dumps(ahead)
    finally:
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=20)
    assert follower.returncode == 0, err
    assert "Traceback" not in err


def test_a_bug_in_the_batch_loop_stops_the_worker_and_a_restart_loses_nothing(make_settings, tmp_path, worker_for):
    # Not a stall: a worker whose batch loop fails exits (an orchestrator restarts it),
    # having committed nothing it had not made durable.
    import os

    settings = make_settings()
    register_sample(settings, tmp_path)
    valid, _ = sample.inferences(2000)
    produce(settings, valid[:1000] + [b"not json"] + valid[1000:])
    broken = ("import sys\n"
              "from enricher.stream import deadletters\n"
              "async def send(*args, **kwargs):\n"
              "    raise RuntimeError('a bug in the batch loop')\n"
              "deadletters.send = send\n"
              "from enricher.cli import main\n"
              "sys.exit(main(['worker']))\n")
    with open(tmp_path / "broken.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", broken], env={**os.environ, **settings.to_env()},
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError("the worker kept running with its batch loop dead")
    assert code != 0
    assert "a bug in the batch loop" in (tmp_path / "broken.log").read_text()
    assert committed_offsets(settings) == [-1001] * settings.topic_partitions  # nothing committed

    worker = worker_for(settings)
    worker.wait_for(lambda s: s["consumed"] >= 2001, timeout=120)
    assert count_rows(settings) == (2000, 2000)
    assert [r.reason for r in deadletters.read(settings, expected=1)] == ["invalid_json"]


def test_a_registered_models_view_is_there_before_its_first_inference(settings, tmp_path, worker_for):
    # Made when the worker starts (and on each refresh), not by the first batch of the model's rows.
    register_sample(settings, tmp_path)
    ensure_topics(settings)
    worker = worker_for(settings)
    worker.wait_for(lambda s: s["consuming_at"] is not None, timeout=120)
    assert count_rows(settings) == (0, 0)
