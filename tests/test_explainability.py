"""Explainability: a surrogate's exact attributions on every row, checked against shap and known answers."""

import numpy as np
import pyarrow as pa
import pytest
import shap
from enricher.models import ENRICHMENTS
from enricher.models.artifact import ArtifactStore
from enricher.models.enrichment import InferenceBatch, published_parameters
from enricher.models.reference import normalise
from enricher.models.spec import ModelSpec

from enricher import sample
from enricher.stream.contract import parse_batch

EX = ENRICHMENTS["explainability"]
SPEC = ModelSpec.from_json(sample.MODEL_ID, sample.SCHEMA)
FEATURES = SPEC.feature_names


def columns(out, names=FEATURES):
    return np.column_stack([out[f"explanation_{f}"].to_numpy(zero_copy_only=False) for f in names])


@pytest.fixture(scope="module")
def fitted():
    return EX.fit(SPEC, normalise(SPEC, sample.reference_table(5000)), {})


def stream_batch(n=2000, seed=3):
    msgs, _ = sample.inferences(n, seed=seed)
    return parse_batch(msgs, [0] * n, list(range(n)), {SPEC.model_id: SPEC}.get, 1 << 20).models[SPEC.model_id]


def test_attributions_equal_shap_on_the_surrogate_and_add_up_on_every_row(fitted):
    rows = stream_batch()
    out = EX.outputs(SPEC)
    assert [o.name for o in out] == [f"explanation_{f}" for f in FEATURES] + \
        ["explanation_base_value", "explanation_output"]
    result = fitted.transform(rows.batch())
    phi = columns(result)
    X = fitted.encoder.transform(rows.values, rows.num_rows)
    expected = shap.TreeExplainer(fitted.surrogate, feature_perturbation="tree_path_dependent").shap_values(X)
    np.testing.assert_allclose(phi, expected, rtol=0, atol=1e-6)
    base = result["explanation_base_value"].to_numpy()
    output = result["explanation_output"].to_numpy()
    assert np.abs(phi.sum(axis=1) + base - output).max() < 1e-6
    assert np.abs(output - fitted.surrogate.predict(X)).max() < 1e-6


def test_the_score_is_explained_by_the_features_that_make_it(fitted):
    # the sample model's score is a logistic of 0.8 f0 - 0.5 f3 + 0.3 [region = west]
    phi = np.abs(columns(fitted.transform(stream_batch().batch()))).mean(axis=0)
    top = [FEATURES[i] for i in np.argsort(-phi)[:3]]
    assert set(top) == {"f0", "f3", "region"}
    assert phi[[FEATURES.index("f0"), FEATURES.index("f3")]].sum() / phi.sum() >= 0.8


def test_fidelity_is_measured_and_a_model_the_surrogate_cannot_follow_is_refused_with_the_reason():
    good = EX.fit(SPEC, normalise(SPEC, sample.reference_table(4000)), {})
    assert good.quality["metric"] == "r2" and good.quality["fidelity"] >= 0.95
    assert good.quality["holdout_rows"] > 500
    EX.check_quality(good.quality, {})
    noise = sample.reference_table(4000)
    noise = noise.set_column(noise.column_names.index("prediction"), "prediction",
                             pa.array(np.random.default_rng(99).random(4000)))  # nothing the features explain
    bad = EX.fit(SPEC, normalise(SPEC, noise), {})
    assert bad.quality["fidelity"] < 0.2
    with pytest.raises(ValueError, match=r"r2 -?0\.\d+ on \d+ held-out reference rows, below min_fidelity 0.8"):
        EX.check_quality(bad.quality, {})
    EX.check_quality(bad.quality, {"min_fidelity": -1.0})  # the user may accept it


def test_a_sample_rate_explains_the_same_rows_in_any_batch_and_replay(fitted):
    rows = stream_batch(4000)
    rated = EX.fit(SPEC, normalise(SPEC, sample.reference_table(3000)), {"sample_rate": 0.25})
    whole = rated.transform(rows.batch())
    explained = whole["explanation_output"].is_valid().to_numpy(zero_copy_only=False)
    assert 0.2 < explained.mean() < 0.3
    for name, arr in whole.items():  # all or nothing per row
        assert np.array_equal(arr.is_valid().to_numpy(zero_copy_only=False), explained), name
    cut = rated.transform(rows.batch().slice(1000, 500))  # another batch boundary, a replay
    assert np.array_equal(cut["explanation_output"].is_valid().to_numpy(zero_copy_only=False),
                          explained[1000:1500])
    np.testing.assert_allclose(columns(cut)[explained[1000:1500]], columns(whole)[1000:1500][explained[1000:1500]])


def test_multiclass_explains_the_class_the_model_predicted_in_margin_space():
    spec = ModelSpec.from_json("classes", {**sample.SCHEMA, "task": "multiclass_classification"})
    reference = sample.reference_table(4000)
    p = reference.column("prediction").to_numpy()
    classes = np.array(["low", "mid", "high"])[np.digitize(p, [0.4, 0.6])]
    reference = reference.set_column(reference.column_names.index("prediction"), "prediction", pa.array(classes))
    reference = reference.drop_columns(["label"])
    fitted = EX.fit(spec, normalise(spec, reference), {})
    assert fitted.quality["metric"] == "accuracy" and fitted.quality["fidelity"] > 0.85
    ref = normalise(spec, reference).slice(0, 600)
    batch = InferenceBatch.from_reference(spec, ref)
    out = fitted.transform(batch)
    X = fitted.encoder.transform(batch.columns, batch.num_rows)
    margins = fitted.surrogate.decision_function(X)
    told = [fitted.classes.index(c) for c in batch.prediction.to_pylist()]
    np.testing.assert_allclose(out["explanation_output"].to_numpy(), margins[np.arange(600), told], atol=1e-9)
    phi = columns(out)
    assert np.abs(phi.sum(axis=1) + out["explanation_base_value"].to_numpy()
                  - out["explanation_output"].to_numpy()).max() < 1e-6


def test_binary_class_labels_explain_the_predicted_class_margin():
    spec = ModelSpec.from_json("labels", {**sample.SCHEMA, "prediction_type": "categorical"})
    reference = sample.reference_table(3000)
    yes = np.where(reference.column("prediction").to_numpy() > 0.5, "yes", "no")
    reference = reference.set_column(reference.column_names.index("prediction"), "prediction", pa.array(yes))
    reference = reference.drop_columns(["label"])
    fitted = EX.fit(spec, normalise(spec, reference), {})
    ref = normalise(spec, reference).slice(0, 400)
    out = fitted.transform(InferenceBatch.from_reference(spec, ref))
    X = fitted.encoder.transform({n: ref.column(n) for n in spec.feature_names}, 400)
    margin = fitted.surrogate.decision_function(X)  # log-odds of classes_[1] = "yes"
    sign = np.where(np.array(ref.column("prediction").to_pylist()) == "yes", 1, -1)
    np.testing.assert_allclose(out["explanation_output"].to_numpy(), sign * margin, atol=1e-9)
    phi = columns(out)
    assert np.abs(phi.sum(axis=1) + out["explanation_base_value"].to_numpy()
                  - out["explanation_output"].to_numpy()).max() < 1e-6


def test_the_artifact_round_trips_through_the_verified_store(tmp_path, fitted):
    store = ArtifactStore(tmp_path)
    manifest = store.publish(SPEC.model_id, EX.name, fitted.to_blobs(), 5000, published_parameters(fitted))
    assert manifest.parameters["quality"]["fidelity"] == fitted.quality["fidelity"]
    artifact = store.load(SPEC.model_id, EX.name)
    loaded = EX.load(SPEC, artifact.manifest, artifact.blobs)
    batch = stream_batch(300).batch()
    np.testing.assert_array_equal(columns(loaded.transform(batch)), columns(fitted.transform(batch)))
    assert loaded.quality == fitted.quality


@pytest.mark.parametrize("config, field", [({"max_depth": 11}, "max_depth"), ({"sample_rate": 1.5}, "sample_rate"),
                                           ({"min_fidelity": "high"}, "min_fidelity"), ({"trees": 3}, "unknown"),
                                           ({"learning_rate": 0}, "learning_rate")])
def test_bad_settings_are_refused_naming_the_setting(config, field):
    with pytest.raises(ValueError, match=field):
        EX.check_config(config)


def test_a_model_with_a_feature_named_output_cannot_use_it():
    from enricher.models.enrichment import Unusable

    spec = ModelSpec.from_json("m", {"task": "regression", "features": [{"name": "output", "type": "numeric"}]})
    with pytest.raises(Unusable, match="explanation_output"):
        EX.check_model(spec)
