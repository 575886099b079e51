"""Faults on the batch path, each injected for real: the store refusing rows,
the store's table changed under the worker, a bug triggered by one message,
an enrichment that returns nonsense."""

from __future__ import annotations

import json
import signal
from collections import Counter

import orjson
import pyarrow as pa
import pytest
from enricher.models.artifact import ArtifactStore

from enricher import metrics, sample
from enricher.store.sink import ClickHouseSink, StoreUnavailable
from enricher.stream import deadletters
from enricher.stream.batch import BatchProcessor, Messages
from enricher.stream.serving import Active, Serving

from .clickhouse_http import ClickHouseHTTP
from .conftest import register_sample
from .test_stream import count_rows, produce, query

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def worker_over_http(make_settings, tmp_path, server):
    from enricher.supervise import WorkerProcess

    settings = make_settings(clickhouse_url=server.url(), max_message_bytes=1 << 20)
    register_sample(settings, tmp_path)
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
    yield settings, worker
    worker.stop(signal.SIGKILL if worker.process.poll() is None else signal.SIGTERM, timeout=5)


def alter(server, sql: str) -> None:
    with server.lock:
        server.conn.query(sql)


def batched(settings, messages):
    produce(settings, messages, batch="json")


def test_rows_the_store_refuses_are_dead_lettered_alone_and_the_rest_is_written(worker_over_http, server):
    settings, worker = worker_over_http
    batched(settings, sample.inferences(1000, id_prefix="before")[0])
    worker.wait_for(lambda s: s["enriched"] >= 1000, timeout=120)
    # The store itself refuses some rows: a constraint the worker knows nothing of.
    alter(server, "ALTER TABLE enricher_store.enriched ADD CONSTRAINT no_poison "
                  "CHECK NOT startsWith(inference_id, 'poison')")
    messages = sample.inferences(2000, id_prefix="during")[0]
    for k in (5, 777, 1999):
        messages[k] = messages[k].replace(b'"during-', b'"poison-')
    batched(settings, messages)
    worker.wait_for(lambda s: s["enriched"] + s["dead_lettered"] >= 3000, timeout=120)
    batched(settings, sample.inferences(500, id_prefix="after")[0])
    status = worker.wait_for(lambda s: s["enriched"] >= 3497, timeout=120)
    assert (status["enriched"], status["dead_lettered"]) == (3497, 3)
    assert count_rows(settings) == (3497, 3497)
    # splitting wrote each accepted row once: storage holds no copy of the refused batch's good rows
    _, stored = query(settings, "SELECT count() FROM enricher_store.enriched")
    assert stored[0][0] == 3497
    records = deadletters.read(settings, expected=3)
    assert [r.reason for r in records] == ["store_rejected"] * 3
    assert sorted(json.loads(r.value)["inference_id"] for r in records) == \
        ["poison-0000005", "poison-0000777", "poison-0001999"]
    assert all("no_poison" in r.detail and "enricher_store" in r.detail for r in records)
    assert all(r.batch_index is not None for r in records), "a row of a batched message leaves alone"


def test_a_table_changed_under_the_worker_dead_letters_its_rows_naming_the_column(worker_over_http, server):
    settings, worker = worker_over_http
    batched(settings, sample.inferences(500, id_prefix="before")[0])
    worker.wait_for(lambda s: s["enriched"] >= 500, timeout=120)
    alter(server, "ALTER TABLE enricher_store.enriched DROP COLUMN label_class")
    batched(settings, sample.inferences(300, id_prefix="during")[0])
    status = worker.wait_for(lambda s: s["dead_lettered"] >= 300, timeout=120)
    assert (status["enriched"], status["dead_lettered"]) == (500, 300), "no retry loop on a mismatch"
    records = deadletters.read(settings, expected=300)
    assert Counter(r.reason for r in records) == {"store_rejected": 300}
    assert "label_class" in records[0].detail and "enricher_store" in records[0].detail
    # Put right, the stream goes on where it was, without a restart.
    alter(server, "ALTER TABLE enricher_store.enriched ADD COLUMN label_class LowCardinality(Nullable(String))")
    batched(settings, sample.inferences(200, id_prefix="after")[0])
    worker.wait_for(lambda s: s["enriched"] >= 700, timeout=120)
    assert worker.process.poll() is None


@pytest.fixture
def processor(settings, tmp_path):
    registry = register_sample(settings, tmp_path)
    serving = Serving(registry, ArtifactStore(settings.artifact_dir))
    processor = BatchProcessor(settings, serving, ClickHouseSink(settings))
    yield processor
    # chDB holds one store per process: close it, or the next test's store cannot open
    processor.sink.tables.client.close()


def stored_ids(processor) -> set[str]:
    result = processor.sink.tables.client.query(f"SELECT inference_id FROM enricher.{sample.MODEL_ID}")
    return {r[0] for r in result.result_rows}


def test_a_bug_triggered_by_one_message_sets_that_message_aside_and_writes_the_rest(processor, monkeypatch):
    messages, _ = sample.inferences(64)
    trigger = json.loads(messages[37])["inference_id"]
    real = processor.enrich

    def enrich_with_a_bug(parsed, *args):  # a bug on our side that one message's content sets off
        ids = [i for rows in parsed.models.values() for i in rows.inference_id.to_pylist()]
        if trigger in ids:
            raise KeyError("a bug")
        return real(parsed, *args)

    monkeypatch.setattr(processor, "enrich", enrich_with_a_bug)
    before = metrics.INTERNAL_ERRORS._value.get()
    outcome = processor.handle(Messages(messages, [0] * 64, list(range(64))))
    assert outcome.written == {sample.MODEL_ID: 63}
    [dead] = outcome.dead
    assert (dead.reason, dead.offset, dead.raw) == ("internal_error", 37, messages[37])
    assert "KeyError" in dead.detail
    assert stored_ids(processor) == {json.loads(m)["inference_id"] for m in messages} - {trigger}
    assert metrics.INTERNAL_ERRORS._value.get() - before == 7, "log2(64) + 1 failing batches, no more"


class Nonsense:
    """An enrichment artifact whose output breaks the contract."""

    def __init__(self, output):
        self.output = output

    def transform(self, batch):
        return self.output(batch.num_rows)


@pytest.mark.parametrize("output", [
    lambda n: {"anomaly_score": pa.array([0.5] * (n - 1))},              # one value short
    lambda n: {"anomaly_score": pa.array(["high"] * n)},                 # not a number
    lambda n: {"surprise": pa.array([0.5] * n)},                         # undeclared column
    lambda n: [0.5] * n,                                                 # not columns at all
], ids=["short", "wrong type", "wrong name", "not a dict"])
def test_an_enrichment_returning_nonsense_leaves_its_columns_null_for_that_batch(processor, output):
    processor.serving._active[sample.MODEL_ID] = {
        "anomaly_detection": Active("anomaly_detection", 9, Nonsense(output))}
    errors = metrics.ENRICHMENT_ERRORS.labels(sample.MODEL_ID, "anomaly_detection")
    before = errors._value.get()
    outcome = processor.handle(Messages(sample.inferences(20)[0], [0] * 20, list(range(20))))
    assert outcome.written == {sample.MODEL_ID: 20} and not outcome.dead
    rows = processor.sink.tables.client.query(
        f"SELECT count(), countIf(anomaly_score IS NULL), countIf(anomaly_detection_version IS NULL) "
        f"FROM enricher.{sample.MODEL_ID}").result_rows
    assert rows == [(20, 20, 20)]
    assert errors._value.get() - before == 1


def test_a_dead_letter_too_large_for_the_producer_is_cut_further_and_still_sent(make_settings, tmp_path):
    # ENRICHER_DLQ_MAX_BYTES above what the producer may send (as with a broker limit below ours):
    # aiokafka refuses the record for its size, and the worker cuts it until it goes.
    from enricher.supervise import WorkerProcess

    settings = make_settings(max_message_bytes=1 << 20, dlq_max_bytes=400_000, max_request_bytes=100_000)
    register_sample(settings, tmp_path)
    big = b"{" + b'"x": "' + b"y" * 300_000 + b'"'  # not JSON (unterminated), 300 KB
    produce(settings, [big] + sample.inferences(500)[0])
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
    try:
        worker.wait_for(lambda s: s["enriched"] + s["dead_lettered"] >= 501, timeout=120)
    finally:
        worker.stop()
    [record] = deadletters.read(settings, expected=1)
    assert record.reason == "invalid_json" and record.original_bytes == len(big)
    assert 1024 <= len(record.value) < 100_000 and big.startswith(record.value)
    assert count_rows(settings) == (500, 500)


def test_a_store_that_refuses_the_workers_credentials_pauses_it_and_dead_letters_nothing(make_settings, tmp_path):
    from enricher.supervise import WorkerProcess

    server = ClickHouseHTTP(tmp_path / "server", user="enricher", password="right").start()
    try:
        settings = make_settings(clickhouse_url=f"http://enricher:wrong@127.0.0.1:{server.port}/enricher")
        register_sample(settings, tmp_path)
        produce(settings, sample.inferences(200)[0])
        worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
        try:
            worker.wait_for(lambda s: "enricher_store_retries_total 0.0" not in worker.metrics(), timeout=60)
            status = worker.status()
            assert (status["enriched"], status["dead_lettered"]) == (0, 0), "retried, not dead-lettered"
            assert "AUTHENTICATION_FAILED" in (tmp_path / "worker.log").read_text()
        finally:
            worker.stop()
    finally:
        server.stop()


def test_a_batch_handled_again_adds_nothing_to_storage_even_when_the_store_took_it_the_first_time(processor):
    """A redelivered batch, and a retried insert whose first attempt the store did
    take (the answer was lost): the storage table itself holds each row once."""
    from clickhouse_connect.driver.exceptions import OperationalError

    messages, _ = sample.inferences(300)
    labels = [orjson.dumps({"model_id": sample.MODEL_ID, "inference_id": "inf-0000001", "label": 1})]
    batch = Messages(messages + labels, [0] * 301, list(range(301)))
    tables = processor.sink.tables
    real = tables.insert
    lost = []

    def insert_then_lose_the_answer(table, token=None):
        real(table, token)
        if not lost:
            lost.append(token)
            raise OperationalError("connection reset after the insert was done")

    tables.insert = insert_then_lose_the_answer
    with pytest.raises(StoreUnavailable):
        processor.handle(batch)
    assert lost and lost[0].startswith(processor.settings.inference_topic + "|0:0-300|301|")
    processor.handle(batch)  # the retry
    processor.handle(batch)  # and a redelivery of the same messages
    client = processor.sink.tables.client  # (the failed connection was closed and replaced)
    storage = client.query("SELECT count() FROM enricher_store.enriched").result_rows[0][0]
    assert storage == 300
    assert client.query("SELECT count() FROM enricher_store.labels").result_rows[0][0] == 1
