"""Missing values: a feature the schema marks nullable may be null in a message; the row is
enriched, not dead-lettered. Explanations follow the model's own routing of a missing value
(the user's model file: its library's; the surrogate: what it learnt from the reference's
gaps); anomaly detection reads a missing value as the feature's reference median."""

import time

import lightgbm
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from enricher.models import ENRICHMENTS
from enricher.models.enrichment import InferenceBatch
from enricher.models.reference import ReferenceDataError, normalise
from enricher.models.registry import ModelRegistry
from enricher.models.spec import ModelSpec, SpecError
from enricher.pipelines.train import train

from enricher.store.query import query
from enricher.stream import deadletters

from .test_stream import produce, worker_for  # noqa: F401 - a fixture

pytestmark = pytest.mark.timeout(300)

SCHEMA = {"task": "regression", "features": [{"name": "a", "type": "numeric"},
                                             {"name": "b", "type": "numeric", "nullable": True},
                                             {"name": "c", "type": "numeric"}]}


def gappy(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    X = np.round(rng.normal(size=(n, 3)), 2)
    X[rng.random(n) < 0.2, 1] = np.nan  # b has gaps; the model routes them
    y = X[:, 0] + np.where(np.isnan(X[:, 1]), 3.0, X[:, 1]) + 0.5 * X[:, 2]
    return X, y


def write_reference(path, X, prediction):
    pq.write_table(pa.table({"a": X[:, 0], "b": X[:, 1], "c": X[:, 2], "prediction": prediction}), path)


def test_a_null_in_a_nullable_feature_is_enriched_with_the_models_own_routing(make_settings, tmp_path,
                                                                                worker_for):
    settings = make_settings(topic_partitions=1)
    X, y = gappy()
    model = lightgbm.LGBMRegressor(n_estimators=30, num_leaves=15, verbose=-1).fit(X, y)
    model_path = tmp_path / "model.txt"
    model.booster_.save_model(str(model_path))
    reference = tmp_path / "reference.parquet"
    write_reference(reference, X, model.predict(X))  # pandas-style: the gaps are NaN
    registry = ModelRegistry(settings.registry_dir)
    registry.register("gappy", SCHEMA, reference, model_path)
    registry.set_enrichment("gappy", "anomaly_detection", True)
    registry.set_enrichment("gappy", "explainability", True)
    train(registry, settings.artifacts(), "gappy", log=lambda m: None)

    rng = np.random.default_rng(1)
    rows = np.round(rng.normal(size=(300, 3)), 2)
    rows[::3, 1] = np.nan  # every third row: b missing
    start = int(time.time() * 1000)
    messages = []
    for i, r in enumerate(rows):
        features = {"a": float(r[0]), "b": None if np.isnan(r[1]) else float(r[1]), "c": float(r[2])}
        messages.append(orjson.dumps({"model_id": "gappy", "inference_id": f"g-{i:04d}", "timestamp": start + i,
                                      "features": features, "prediction": float(model.predict(r[None])[0])}))
    not_nullable = orjson.dumps({"model_id": "gappy", "inference_id": "no-a", "timestamp": start,
                                 "features": {"a": None, "b": 0.1, "c": 0.2}, "prediction": 0.0})
    produce(settings, messages[:150] + [not_nullable] + messages[150:])
    worker = worker_for(settings)
    worker.wait_for(lambda s: s["consumed"] >= 301, timeout=120)
    worker.stop()

    _, stored = query(settings, "SELECT inference_id, a, b, c, anomaly_score, explanation_a, explanation_b, "
                                "explanation_c, explanation_base_value, explanation_output FROM enricher.gappy "
                                "ORDER BY inference_id")
    assert len(stored) == 300 and sum(r[2] is None for r in stored) == 100  # stored as NULL, not a made-up value
    assert all(r[4] is not None and 0 < r[4] < 1 for r in stored)
    phi = np.array([r[5:8] for r in stored], np.float64)
    contrib = np.asarray(model.predict(rows, pred_contrib=True))  # LightGBM's own, on NaN where b was null
    np.testing.assert_allclose(phi, contrib[:, :3], rtol=0, atol=1e-9)
    np.testing.assert_allclose([r[9] for r in stored], model.predict(rows, raw_score=True), rtol=0, atol=1e-9)

    dead = deadletters.read(settings, expected=1)
    assert [(d.reason, d.value) for d in dead] == [("missing_feature", not_nullable)]
    assert "'a'" in dead[0].detail


def test_anomaly_detection_reads_a_missing_value_as_the_reference_median(tmp_path):
    X, y = gappy()
    spec = ModelSpec.from_json("gappy", SCHEMA)
    write_reference(tmp_path / "r.parquet", X, y)
    reference = normalise(spec, pq.read_table(tmp_path / "r.parquet"))
    assert reference.column("b").null_count == int(np.isnan(X[:, 1]).sum())  # NaN read as missing
    anomaly = ENRICHMENTS["anomaly_detection"]
    fitted = anomaly.fit(spec, reference, {})
    median = fitted.encoder.medians["b"]
    batch = pa.table({"a": [0.3, 0.3], "b": pa.array([None, median], pa.float64()), "c": [-1.0, -1.0],
                      "prediction": [0.0, 0.0]})
    scores = fitted.transform(InferenceBatch.from_reference(spec, batch))["anomaly_score"].to_numpy()
    assert scores[0] == scores[1]


def test_the_surrogate_learns_where_a_missing_value_goes(tmp_path):
    """No model file: the surrogate is trained on the reference with its gaps, so a row with b
    missing is explained by what missing b does to the model (+3 here), exactly additive."""
    X, y = gappy(seed=2)
    spec = ModelSpec.from_json("gappy", SCHEMA)
    write_reference(tmp_path / "r.parquet", X, y)
    reference = normalise(spec, pq.read_table(tmp_path / "r.parquet"))
    explain = ENRICHMENTS["explainability"]
    fitted = explain.fit(spec, reference, {"n_estimators": 150})
    assert fitted.quality["fidelity"] > 0.97
    batch = pa.table({"a": [0.0] * 4, "b": pa.array([None, None, 0.0, -1.0], pa.float64()), "c": [0.0] * 4,
                      "prediction": [0.0] * 4})
    out = fitted.transform(InferenceBatch.from_reference(spec, batch))
    phi_b = out["explanation_b"].to_numpy()
    output = out["explanation_output"].to_numpy()
    assert phi_b[0] > 1.5 and phi_b[1] == phi_b[0]      # missing b: the model's +3, not the median's ~0
    assert abs(output[0] - 3.0) < 0.4 and abs(output[3] + 1.0) < 0.4
    total = sum(out[f"explanation_{f}"].to_numpy() for f in "abc") + out["explanation_base_value"].to_numpy()
    assert np.abs(total - output).max() < 1e-9


def test_nullable_is_a_feature_setting_and_a_gap_elsewhere_says_how_to_allow_it(tmp_path):
    with pytest.raises(SpecError, match=r"features\[1\].nullable: must be true or false"):
        ModelSpec.from_json("m", {**SCHEMA, "features": [SCHEMA["features"][0],
                                                          {"name": "b", "type": "numeric", "nullable": "yes"}]})
    with pytest.raises(SpecError, match="nullable' is for features"):
        ModelSpec.from_json("m", {**SCHEMA, "attributes": [{"name": "s", "type": "categorical", "nullable": True}]})
    assert ModelSpec.from_json("m", SCHEMA).to_json()["features"][1]["nullable"] is True
    X, y = gappy()
    X[5, 0] = np.nan  # a gap in a feature not marked nullable
    write_reference(tmp_path / "r.parquet", X, y)
    with pytest.raises(ReferenceDataError, match="'a'.*\"nullable\": true"):
        normalise(ModelSpec.from_json("m", SCHEMA), pq.read_table(tmp_path / "r.parquet"))
