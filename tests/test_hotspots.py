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


def test_the_worker_tags_rows_and_the_report_lists_each_hotspot_with_its_window_accuracy(tmp_path, capsys):
    import time

    import orjson
    import pyarrow.parquet as pq
    from enricher.models.registry import ModelRegistry
    from enricher.pipelines.train import train

    from enricher.cli import main
    from enricher.config import Settings
    from enricher.store.reports import REPORTS, ReportStore
    from enricher.store.sink import ClickHouseSink
    from enricher.stream.batch import BatchProcessor, Messages
    from enricher.stream.serving import Serving

    settings = Settings.from_env(env={}, data_dir=str(tmp_path / "data"), broker="kafka://127.0.0.1:1")
    reference, _ = data(6000, seed=6)
    pq.write_table(reference, tmp_path / "loans.parquet")
    registry = ModelRegistry(settings.registry_dir)
    registry.register("loans", SCHEMA, tmp_path / "loans.parquet")
    registry.set_enrichment("loans", "hotspots", True)
    train(registry, settings.artifacts(), "loans", log=lambda m: None)
    processor = BatchProcessor(settings, Serving(registry, settings.artifacts()), ClickHouseSink(settings))
    stream, inside = data(2000, seed=7)
    now = int(time.time() * 1000) - 5000
    messages = [orjson.dumps({"model_id": "loans", "inference_id": f"l{i}", "timestamp": now + i,
                              "features": {"income": r["income"], "age": r["age"], "region": r["region"]},
                              "prediction": r["prediction"], "label": r["label"]})
                for i, r in enumerate(stream.to_pylist())]
    processor.handle(Messages(messages, [0] * len(messages), list(range(len(messages)))))
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
        InferenceBatch.from_reference(registry.get("loans"), stream))[OUTPUT].to_numpy(zero_copy_only=False)
    assert {h["id"]: h["rows"] for h in report["hotspots"]} == {h: int((tags == h).sum()) for h in set(tags) if h}
    processor.sink.tables.client.close()
    assert main(["--data-dir", str(settings.data_dir), "hotspots", "loans", "--window", "1h"]) == 0
    assert "h1: income" in capsys.readouterr().out
