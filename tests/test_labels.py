"""Late labels: label updates on the inference topic reach their rows (enricher/store/labels.py)."""

import json
import time
import urllib.request

import orjson
import pyarrow as pa
import pytest
from enricher.models.artifact import ArtifactStore

from enricher import sample
from enricher.config import Settings
from enricher.store.labels import LabelSweep
from enricher.store.sink import ClickHouseSink
from enricher.stream.batch import BatchProcessor, Messages
from enricher.stream.contract import ARROW_STREAM, to_ipc
from enricher.stream.serving import Serving
from tests.conftest import register_sample

VIEW = f"enricher.{sample.MODEL_ID}"


@pytest.fixture
def engine(tmp_path):
    """A batch processor and a label sweep on one chDB store, no broker needed."""
    settings = Settings.from_env(env={}, data_dir=str(tmp_path / "data"), broker="kafka://127.0.0.1:1")
    registry = register_sample(settings, tmp_path, enable=False, trained=False)
    serving = Serving(registry, ArtifactStore(settings.artifact_dir))
    processor = BatchProcessor(settings, serving, ClickHouseSink(settings))
    offsets = iter(range(10**9))

    def send(messages, content_types=None):
        messages = [m if isinstance(m, bytes) else orjson.dumps(m) for m in messages]
        return processor.handle(Messages(messages, [0] * len(messages), [next(offsets) for _ in messages],
                                         content_types))

    sweep = LabelSweep(processor.sink.tables)
    yield processor, send, sweep, registry, settings
    processor.sink.tables.client.close()


def q(processor, sql):
    return processor.sink.tables.client.query(sql).result_rows


def inferences(n, prefix, **kw):
    return sample.inferences(n, id_prefix=prefix, **kw)[0]


def label(i, value, model=sample.MODEL_ID):
    return {"model_id": model, "inference_id": i, "label": value}


def test_a_label_after_its_inference_reaches_the_row(engine):
    processor, send, sweep, *_ = engine
    send(inferences(100, "a"))
    outcome = send([label(f"a-{i:07d}", i % 2) for i in range(0, 50, 2)]  # one message per label ...
                   + [[label(f"a-{i:07d}", i % 2) for i in range(1, 50, 2)]])  # ... and a batched one
    assert outcome.labels == {sample.MODEL_ID: 50} and outcome.written == {} and not outcome.dead
    assert q(processor, f"SELECT countIf(label IS NOT NULL) FROM {VIEW}") == [(0,)], "not before the sweep"
    result = sweep.run()
    assert (result.applied, result.pending) == (50, 0)
    rows = q(processor, f"SELECT inference_id, label, label_at IS NOT NULL, f0 IS NOT NULL FROM {VIEW} "
                        "ORDER BY inference_id")
    assert len(rows) == 100
    assert rows[:50] == [(f"a-{i:07d}", float(i % 2), True, True) for i in range(50)]
    assert all(r[1] is None and not r[2] for r in rows[50:])
    assert sweep.run().applied == 0, "a second sweep writes nothing new"


def test_a_label_before_its_inference_waits_and_is_applied_when_it_arrives(engine):
    processor, send, sweep, *_ = engine
    send([[label(f"b-{i:07d}", 1) for i in range(10)]])
    assert sweep.run().pending == 10
    assert q(processor, "SELECT count() FROM enricher_store.labels FINAL") == [(10,)]
    send(inferences(20, "b"))
    assert sweep.run().applied == 10
    assert q(processor, f"SELECT countIf(label = 1), countIf(label IS NULL) FROM {VIEW}") == [(10, 10)]
    assert sweep.run().applied == 0


def test_the_latest_label_wins_across_and_within_batches_and_over_the_inference_own(engine):
    processor, send, sweep, *_ = engine
    own = [json.loads(m) for m in inferences(3, "c")]
    for m in own:
        m["label"] = 0
    send(own)
    send([label("c-0000000", 1)])
    sweep.run()
    send([label("c-0000000", 0), label("c-0000001", 1), [label("c-0000001", 0), label("c-0000001", 1)]])
    sweep.run()
    got = dict(q(processor, f"SELECT inference_id, label FROM {VIEW}"))
    assert got == {"c-0000000": 0.0, "c-0000001": 1.0, "c-0000002": 0.0}
    # a redelivered copy of an inference (its own, older label) does not undo the update
    again = dict(own[1], label=0)
    processor.handle(Messages([orjson.dumps(again)], [1], [99]))
    sweep.run()
    assert dict(q(processor, f"SELECT inference_id, label FROM {VIEW}"))["c-0000001"] == 1.0


def test_labels_twice_and_for_unknown_ids_add_no_rows_to_the_view(engine):
    processor, send, sweep, *_ = engine
    send(inferences(10, "d"))
    for value in (0, 1):
        send([[label(f"d-{i:07d}", value) for i in range(10)] + [label("never-seen", value)]])
        sweep.run()
    assert q(processor, f"SELECT count(), countIf(label = 1) FROM {VIEW}") == [(10, 10)]
    assert q(processor, "SELECT label FROM enricher_store.labels FINAL WHERE inference_id = 'never-seen'"
             ) == [(1.0,)]
    assert q(processor, "SELECT count() FROM enricher_store.enriched WHERE inference_id = 'never-seen'") == [(0,)]


def test_a_restarted_sweep_goes_on_where_the_last_one_stopped(engine):
    processor, send, sweep, *_ = engine
    send(inferences(5, "e"))
    send([label("e-0000000", 1)])
    sweep.run()
    send([label("e-0000001", 1)])
    fresh = LabelSweep(processor.sink.tables)  # another process, say
    assert fresh.run().applied == 1
    assert q(processor, f"SELECT countIf(label = 1) FROM {VIEW}") == [(2,)]


def test_class_labels_and_arrow_label_streams(engine, tmp_path):
    processor, send, sweep, registry, settings = engine
    schema = dict(sample.SCHEMA, task="multiclass_classification")
    registry.register("classes", schema, tmp_path / f"reference-{sample.MODEL_ID}.parquet")
    processor.serving.refresh()
    msgs = [json.loads(m) for m in inferences(4, "f", model_id="classes")]
    send([dict(m, prediction="cat") for m in msgs])
    stream = to_ipc(pa.table({"model_id": ["classes"] * 3, "inference_id": ["f-0000000", "f-0000001", "f-0000002"],
                              "label": ["dog", "cat", "dog"]}))
    assert send([stream], [ARROW_STREAM]).labels == {"classes": 3}
    sweep.run()
    assert q(processor, "SELECT inference_id, label FROM enricher.classes ORDER BY inference_id") == [
        ("f-0000000", "dog"), ("f-0000001", "cat"), ("f-0000002", "dog"), ("f-0000003", None)]


@pytest.mark.parametrize("update, reason", [
    ({"inference_id": "x", "label": "yes"}, "wrong_type"),          # not a number, for a numeric model
    ({"inference_id": "x", "label": None}, "missing_field"),
    ({"inference_id": ["x"], "label": 1}, "wrong_type"),
    ({"label": 1}, "missing_field"),
    ({"inference_id": "x" * 2000, "label": 1}, "out_of_range"),
    ({"inference_id": "x", "label": 1, "model_id": "nobody"}, "unknown_model"),
])
def test_a_bad_label_update_is_a_dead_letter_with_its_reason(engine, update, reason):
    processor, send, sweep, *_ = engine
    outcome = send([{"model_id": sample.MODEL_ID, **update}, label("ok", 1)])
    assert [d.reason for d in outcome.dead] == [reason]
    assert outcome.labels == {sample.MODEL_ID: 1}


@pytest.mark.timeout(300)
def test_a_worker_brings_streamed_labels_to_their_rows(make_settings, tmp_path):
    """Through the broker and a worker: labels before and after their inferences, batched and not."""
    import signal
    import time

    from enricher.store.query import query
    from enricher.supervise import WorkerProcess
    from tests.test_stream import produce

    settings = make_settings(label_sweep_interval=0.5, drift_interval=1.0)
    register_sample(settings, tmp_path, enable=False, trained=False)
    early = [[label(f"g-{i:07d}", 1) for i in range(0, 200)]]           # before their inferences
    produce(settings, [orjson.dumps(m) for m in early])
    produce(settings, inferences(1000, "g"), batch="json")
    late = [orjson.dumps(label(f"g-{i:07d}", 0)) for i in range(500, 600)]  # after, one per message
    produce(settings, late)
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
    try:
        worker.wait_for(lambda s: s["enriched"] >= 1000, timeout=120)

        def labelled():
            _, rows = query(settings, f"SELECT countIf(label = 1), countIf(label = 0), count() FROM {VIEW}")
            return tuple(rows[0])
        deadline = time.monotonic() + 120
        while labelled() != (200, 100, 1000) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert labelled() == (200, 100, 1000)
        assert "enricher_labels_received_total" in worker.metrics()
        # the performance report over those labels, from the API and as gauges
        with urllib.request.urlopen(f"{worker.url}/models/{sample.MODEL_ID}/performance?window=1d") as resp:
            report = json.loads(resp.read())
        assert (report["rows"], report["labelled"], report["label_coverage"]) == (1000, 300, 0.3)
        deadline = time.monotonic() + 60
        gauge = f'enricher_performance{{metric="labelled",model="{sample.MODEL_ID}"}} 300.0'
        while gauge not in worker.metrics():
            assert time.monotonic() < deadline, "no performance gauge exported"
            time.sleep(0.5)
    finally:
        worker.stop(signal.SIGTERM, timeout=30)


def test_a_label_keeps_the_features_of_slot_columns_another_worker_added(engine, tmp_path):
    """The sweeper's process has not seen the slot columns a wider model needed (another
    worker made them): the labelled copy of a row still carries every feature."""
    import pyarrow.parquet as pq

    from enricher.store.clickhouse import EnrichedTables, Schema
    from enricher.stream.contract import parse_batch
    from enricher.stream.enrich import enrich

    processor, send, sweep, registry, _ = engine
    sweep.run()  # the sweeper has looked at the table already
    pq.write_table(pa.table({**{f"x{i}": [0.0, 1.0] for i in range(14)}, "prediction": [0.0, 1.0]}),
                   tmp_path / "wide.parquet")
    wide = registry.register("wide", {"task": "regression",
                                      "features": [{"name": f"x{i}", "type": "numeric"} for i in range(14)]},
                             tmp_path / "wide.parquet")
    processor.serving.refresh()
    other = EnrichedTables(processor.sink.tables.client, "enricher", Schema())  # another worker's view of it
    other.ensure_view(wide)
    msg = orjson.dumps({"model_id": "wide", "inference_id": "w1", "timestamp": int(time.time() * 1000),
                        "features": {f"x{i}": float(i) for i in range(14)}, "prediction": 1.0})
    rows = parse_batch([msg], [0], [0], {"wide": wide}.get, 1 << 20).models["wide"]
    other.insert(enrich(rows, {}, int(time.time() * 1e6)))
    processor.handle(Messages([orjson.dumps(label("w1", 2.5, model="wide"))], [0], [10**6]))
    assert sweep.run().applied == 1
    assert q(processor, "SELECT x13, x10, label FROM enricher.wide") == [(13.0, 10.0, 2.5)]
