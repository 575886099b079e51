"""Hotspots against known answers: a planted region where the model is wrong is found, a
model with none gets none, and the worker's tags are the tree's leaves (models/hotspots.py)."""

import numpy as np
import pyarrow as pa
import pytest
from enricher.models.enrichment import InferenceBatch, Unusable
from enricher.models.hotspots import OUTPUT, Hotspots
from enricher.models.reference import normalise
from enricher.models.spec import ModelSpec

SCHEMA = {"task": "binary_classification",
          "features": [{"name": "income", "type": "numeric"}, {"name": "age", "type": "numeric"},
                       {"name": "region", "type": "categorical"}]}
SPEC = ModelSpec.from_json("loans", SCHEMA)


def data(n, seed, planted=True, region="north", below=30000):
    """A model right 90% of the time, but wrong 80% of the time for low incomes in one region."""
    rng = np.random.default_rng(seed)
    income = rng.uniform(5000, 120000, n)
    regions = rng.choice(["north", "south", "east", "west"], n)
    label = rng.integers(0, 2, n).astype(float)
    inside = (income < below) & (regions == region) if planted else np.zeros(n, bool)
    wrong = rng.random(n) < np.where(inside, 0.8, 0.1)
    score = np.where(wrong, 1 - label, label) * 0.6 + 0.2  # 0.8 or 0.2: a decision at 0.5
    table = pa.table({"income": income, "age": rng.uniform(18, 80, n), "region": regions,
                      "prediction": score, "label": label})
    return normalise(SPEC, table), inside


def test_a_planted_region_of_errors_is_found_and_described_in_readable_rules():
    table, inside = data(8000, seed=1)
    artifact = Hotspots().fit(SPEC, table, {})
    assert artifact.hotspots, "no hotspot found"
    top = artifact.hotspots[0]
    tagged = artifact.transform(InferenceBatch.from_reference(SPEC, table))[OUTPUT].to_numpy(zero_copy_only=False)
    selected = tagged == top["id"]
    overlap = (selected & inside).sum() / max(selected.sum(), inside.sum())
    assert overlap >= 0.8, (overlap, top["rules"])
    assert top["accuracy"] < 0.4 and top["rows"] == int(selected.sum())
    text = " AND ".join(top["rules"])
    assert "income <=" in text and "region IN ('north')" in text and len(top["rules"]) <= 7
    # held-out rows of the same region are tagged too
    test, inside = data(4000, seed=2)
    tagged = artifact.transform(InferenceBatch.from_reference(SPEC, test))[OUTPUT].to_numpy(zero_copy_only=False)
    assert ((tagged == top["id"]) & inside).sum() / inside.sum() >= 0.8


def test_a_model_wrong_nowhere_in_particular_has_no_hotspot():
    table, _ = data(8000, seed=3, planted=False)
    artifact = Hotspots().fit(SPEC, table, {})
    assert artifact.hotspots == [] and artifact.quality["hotspots"] == 0
    assert artifact.transform(InferenceBatch.from_reference(SPEC, table))[OUTPUT].null_count == 8000


def test_a_region_that_moved_moves_in_the_next_version():
    before = Hotspots().fit(SPEC, data(8000, seed=4)[0], {})
    moved, _ = data(8000, seed=5, region="east", below=60000)
    after = Hotspots().fit(SPEC, moved, {})
    assert "region IN ('north')" in " ".join(before.hotspots[0]["rules"])
    assert "region IN ('east')" in " ".join(after.hotspots[0]["rules"])


def test_regression_and_unlabelled_reference_are_refused_with_the_reason():
    with pytest.raises(Unusable, match="not a classifier"):
        Hotspots().check_model(ModelSpec.from_json("m", {**SCHEMA, "task": "regression"}))
    with pytest.raises(Unusable, match="no label column"):
        Hotspots().check_model(SPEC, pa.schema([("income", pa.float64()), ("prediction", pa.float64())]))
    with pytest.raises(ValueError, match="max_depth"):
        Hotspots().check_config({"max_depth": 9})


def registered(tmp_path, reference, config=None):
    """Settings, registry and a worker's batch path (embedded store) for `loans`, hotspots on."""
    import pyarrow.parquet as pq
    from enricher.models.registry import ModelRegistry

    from enricher.config import Settings
    from enricher.store.sink import ClickHouseSink
    from enricher.stream.batch import BatchProcessor
    from enricher.stream.serving import Serving

    settings = Settings.from_env(env={}, data_dir=str(tmp_path / "data"), broker="kafka://127.0.0.1:1")
    pq.write_table(reference, tmp_path / "loans.parquet")
    registry = ModelRegistry(settings.registry_dir)
    registry.register("loans", SCHEMA, tmp_path / "loans.parquet")
    registry.set_enrichment("loans", "hotspots", True, config or {})
    processor = BatchProcessor(settings, Serving(registry, settings.artifacts()), ClickHouseSink(settings))
    return settings, registry, processor


def stream(processor, rows: pa.Table, prefix: str) -> None:
    """The rows as inferences with their labels, through the worker's batch path, just now."""
    import time

    import orjson

    from enricher.stream.batch import Messages

    now = int(time.time() * 1000) - 5000
    messages = [orjson.dumps({"model_id": "loans", "inference_id": f"{prefix}{i}", "timestamp": now + i % 4000,
                              "features": {"income": r["income"], "age": r["age"], "region": r["region"]},
                              "prediction": r["prediction"], "label": r["label"]})
                for i, r in enumerate(rows.to_pylist())]
    for start in range(0, len(messages), 5000):
        piece = messages[start:start + 5000]
        processor.handle(Messages(piece, [0] * len(piece), list(range(start, start + len(piece)))))


def test_the_worker_tags_rows_and_the_report_lists_each_hotspot_with_its_window_accuracy(tmp_path, capsys):
    from enricher.pipelines.train import train

    from enricher.cli import main
    from enricher.store.reports import REPORTS, ReportStore

    reference, _ = data(6000, seed=6)
    settings, registry, processor = registered(tmp_path, reference)
    train(registry, settings.artifacts(), "loans", log=lambda m: None)
    rows, inside = data(2000, seed=7)
    stream(processor, rows, "l")
    store = ReportStore(settings, registry)
    try:
        report = store.run(REPORTS["hotspots"], "loans", "1h")
    finally:
        store.close()
    top = report["hotspots"][0]
    assert top["rows"] >= 0.8 * inside.sum() and top["accuracy"] < 0.4 and report["version"] == 1
    assert report["rows_scored_by_this_version"] == 2000
    from enricher.models.hotspots import Hotspots as H  # the artifact's own tags of the same rows
    verified = settings.artifacts().load("loans", "hotspots")
    tags = H().load(registry.get("loans"), verified.manifest, verified.blobs).transform(
        InferenceBatch.from_reference(registry.get("loans"), rows))[OUTPUT].to_numpy(zero_copy_only=False)
    assert {h["id"]: h["rows"] for h in report["hotspots"]} == {h: int((tags == h).sum()) for h in set(tags) if h}
    processor.sink.tables.client.close()
    assert main(["--data-dir", str(settings.data_dir), "hotspots", "loans", "--window", "1h"]) == 0
    assert "h1: income" in capsys.readouterr().out


def test_hotspots_follow_the_streams_labels_a_region_that_moved_moves_in_the_retrained_version(tmp_path, capsys):
    """Trained on the reference (wrong for low incomes in the north); the stream's labels
    then say the model is wrong for middling incomes in the east and right in the north:
    the version retrained from the stream finds the east and drops the north."""
    from enricher.pipelines.labelled import LabelledRows
    from enricher.pipelines.train import train

    from enricher.cli import main

    reference, _ = data(6000, seed=8)
    settings, registry, processor = registered(tmp_path, reference)
    labelled = LabelledRows(settings)
    first = train(registry, settings.artifacts(), "loans", log=lambda m: None, labelled=labelled)[0]
    assert first.parameters["trained_on"]["stream_rows"] == 0  # nothing streamed yet
    assert "region IN ('north')" in " ".join(_hotspots(settings, registry)[0]["rules"])
    moved, inside = data(12000, seed=9, region="east", below=60000)
    stream(processor, moved, "m")
    second = train(registry, settings.artifacts(), "loans", log=lambda m: None, labelled=labelled)[0]
    trained_on = second.parameters["trained_on"]
    assert (trained_on["reference_rows"], trained_on["stream_rows"]) == (6000, 12000)
    assert second.training_rows == 18000
    found = _hotspots(settings, registry)
    rules = [" AND ".join(h["rules"]) for h in found]
    assert not any("north" in r and "east" not in r for r in rules), rules  # the old region is gone
    top = found[0]
    assert "region IN ('east')" in rules[0], rules
    # the rows the new hotspot selects are the moved region's (>= 80% overlap), on fresh rows
    fresh, inside = data(6000, seed=10, region="east", below=60000)
    artifact = settings.artifacts().load("loans", "hotspots")
    tags = Hotspots().load(SPEC, artifact.manifest, artifact.blobs).transform(
        InferenceBatch.from_reference(SPEC, fresh))[OUTPUT].to_numpy(zero_copy_only=False)
    selected = tags == top["id"]
    assert (selected & inside).sum() / max(selected.sum(), inside.sum()) >= 0.8
    processor.sink.tables.client.close()
    assert main(["--data-dir", str(settings.data_dir), "hotspots", "loans", "--window", "1h"]) == 0
    assert "on 6,000 reference rows and 12,000 labelled stream rows of " in capsys.readouterr().out


def test_the_stream_sample_is_capped_and_drawn_by_a_hash_of_the_inference_id(tmp_path):
    from enricher.models.enrichment import stream_training
    from enricher.pipelines.labelled import LabelledRows

    reference, _ = data(2000, seed=11)
    settings, registry, processor = registered(tmp_path, reference)
    rows, _ = data(3000, seed=12)
    stream(processor, rows, "s")
    spec = registry.get("loans")
    capped = stream_training(Hotspots(), {"stream_rows": 1000})
    one, two = LabelledRows(settings).draw(spec, capped), LabelledRows(settings).draw(spec, capped)
    assert one.rows == 1000 and one.table.equals(two.table)  # the same rows for the same window
    everything = LabelledRows(settings).draw(spec, stream_training(Hotspots(), {}))
    assert everything.rows == 3000
    # the sample is the 1000 rows of smallest hash, not the first or the latest 1000
    incomes = set(one.table.column("income").to_pylist())
    assert incomes <= set(rows.column("income").to_pylist())
    assert incomes != set(rows.column("income").to_pylist()[:1000])
    assert incomes != set(rows.column("income").to_pylist()[-1000:])
    none = LabelledRows(settings).draw(spec, stream_training(Hotspots(), {"stream_rows": 0}))
    assert none.table is None and "not read" in none.note


def _hotspots(settings, registry) -> list[dict]:
    import json

    return json.loads(settings.artifacts().load("loans", "hotspots").blobs["hotspots.json"])


def test_a_store_that_does_not_answer_is_retried_and_a_refused_read_is_not(tmp_path):
    """The hotspots step's read of labelled rows: an unreachable ClickHouse server may answer on
    the next attempt (Unavailable: the step exits for a retry), a read the engine refuses will
    not change (a StepError: exit EXIT_PERMANENT, which the workflow does not retry)."""
    import dataclasses

    from enricher.pipelines import steps
    from enricher.pipelines.labelled import LabelledRows

    from enricher.errors import Unavailable

    reference, _ = data(2000, seed=13)
    settings, registry, processor = registered(tmp_path, reference)
    processor.sink.tables.client.close()
    store = settings.artifacts()
    steps.prepare(registry, store, "loans", "run-1")
    away = dataclasses.replace(settings, clickhouse_url="http://127.0.0.1:1", clickhouse_timeout=2.0)
    with pytest.raises(Unavailable, match="ClickHouse did not answer"):
        steps.train(registry, store, "loans", "run-1", "hotspots", {}, LabelledRows(away))
    with pytest.raises(steps.StepError, match="labelled rows could not be read"):
        steps.train(registry, store, "loans", "run-1", "hotspots", {}, RefusingRows(settings))


class RefusingRows:
    """Draws with a query the real engine refuses (a column the model's view lacks)."""

    def __init__(self, settings):
        from enricher.pipelines.labelled import LabelledRows

        self.rows = LabelledRows(settings)

    def draw(self, spec, training, now=None):
        from enricher.store.query import ask

        ask(self.rows.settings, f"SELECT no_such_column FROM {spec.model_id}")
