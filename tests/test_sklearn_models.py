"""scikit-learn tree models other than gradient boosting, read from skops files and explained
exactly: shap's TreeExplainer (path-dependent) and scikit-learn's own outputs as the reference."""

import numpy as np
import pytest
import shap
import skops.io
from enricher.models import usermodels
from enricher.models.sklearntrees import raw_output
from enricher.models.usermodels import ModelFileError
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

F = 5


def data(task, n=1500, seed=0, missing=0.1):
    rng = np.random.default_rng(seed)
    X = np.round(rng.normal(size=(n, F)), 2)
    signal = 2 * X[:, 0] - X[:, 1] + np.sin(3 * X[:, 2]) + X[:, 3] * X[:, 4]
    X[rng.random(X.shape) < missing] = np.nan  # real tabular data has gaps; these models route them
    if task == "regression":
        return X, signal
    if task == "binary":
        return X, (signal > 0).astype(int)
    return X, np.digitize(signal, [-1.0, 1.0])


MODELS = {
    "random_forest": (RandomForestRegressor, RandomForestClassifier, dict(n_estimators=12, max_depth=8)),
    "extra_trees": (ExtraTreesRegressor, ExtraTreesClassifier, dict(n_estimators=12, max_depth=8)),
    "decision_tree": (DecisionTreeRegressor, DecisionTreeClassifier, dict(max_depth=14)),
    "hist_gradient_boosting": (HistGradientBoostingRegressor, HistGradientBoostingClassifier,
                               dict(max_iter=25, max_depth=6, early_stopping=False)),
}


@pytest.mark.parametrize("task", ["regression", "binary", "multiclass"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_scikit_learn_tree_model_is_explained_as_shap_and_scikit_learn_say(tmp_path, kind, task):
    regressor, classifier, params = MODELS[kind]
    X, y = data(task)
    model = (regressor if task == "regression" else classifier)(random_state=0, **params).fit(X, y)
    path = tmp_path / "model.skops"
    skops.io.dump(model, path)
    read = usermodels.load("model.skops", path.read_bytes(), F)
    ens = read.ensemble
    probe = X[:300]
    expected = raw_output(model, probe)
    assert ens.n_outputs == expected.shape[1]
    explainer = shap.TreeExplainer(model, feature_perturbation="tree_path_dependent")
    values = np.asarray(explainer.shap_values(probe))
    if values.ndim == 2:
        values = values[:, :, None]  # (rows, features, outputs)
    for k in range(ens.n_outputs):
        phi, base, output = ens.explain(probe, k)
        np.testing.assert_allclose(output, expected[:, k], rtol=0, atol=1e-9)
        np.testing.assert_allclose(phi, values[:, :, k], rtol=0, atol=1e-7)
        assert np.abs(phi.sum(axis=1) + base - output).max() < 1e-9


def test_a_pipeline_and_a_multi_output_model_are_refused_with_the_reason(tmp_path):
    X, y = data("regression", missing=0.0)
    pipeline = make_pipeline(StandardScaler(), RandomForestRegressor(n_estimators=2, random_state=0)).fit(X, y)
    path = tmp_path / "pipe.skops"
    skops.io.dump(pipeline, path)
    with pytest.raises(ModelFileError, match="Pipeline: its steps change the row"):
        usermodels.load("pipe.skops", path.read_bytes(), F)
    multi = RandomForestRegressor(n_estimators=2, random_state=0).fit(X, np.column_stack([y, -y]))
    skops.io.dump(multi, path)
    with pytest.raises(ModelFileError, match="2 outputs"):
        usermodels.load("pipe.skops", path.read_bytes(), F)


def test_hist_gradient_boosting_with_categorical_features_is_refused_with_the_reason(tmp_path):
    """Such a model carries a preprocessing function skops does not trust: refused before it loads."""
    X, y = data("regression", missing=0.0)
    X[:, 0] = np.abs(np.round(X[:, 0] * 3)) % 5
    model = HistGradientBoostingRegressor(max_iter=5, categorical_features=[0]).fit(X, y)
    path = tmp_path / "m.skops"
    skops.io.dump(model, path)
    with pytest.raises(ModelFileError, match="types we do not load: .*check_array"):
        usermodels.load("m.skops", path.read_bytes(), F)


@pytest.mark.parametrize("prediction", ["score", "class"])
def test_a_random_forest_classifier_is_trained_and_explained_end_to_end(tmp_path, prediction):
    from tests.test_exact_explanations import _train_and_explain

    X, y = data("binary", missing=0.0)
    model = RandomForestClassifier(n_estimators=10, max_depth=6, random_state=0).fit(X, y)
    path = tmp_path / "model.skops"
    skops.io.dump(model, path)
    features = [{"name": f"x{i}", "type": "numeric"} for i in range(F)]
    if prediction == "score":  # P(class 1) sent as the prediction: that output is explained
        doc = {"task": "binary_classification", "prediction_type": "numeric", "features": features}
        sent, explained = model.predict_proba(X)[:, 1], model.predict_proba(X)[:, 1]
    else:  # the class sent: the probability of the class sent is explained
        doc = {"task": "binary_classification", "prediction_type": "categorical", "features": features}
        sent = model.predict(X).astype(str)
        explained = model.predict_proba(X).max(axis=1)
    quality, phi, output = _train_and_explain(tmp_path, X, sent, doc, path)
    assert quality["fidelity"] > 0.999999 and quality["checked_against"]["library"].startswith("scikit-learn")
    np.testing.assert_allclose(output, explained, rtol=0, atol=1e-9)
    values = np.asarray(shap.TreeExplainer(model).shap_values(X))  # (rows, features, classes)
    chosen = 1 if prediction == "score" else model.predict(X)
    np.testing.assert_allclose(phi, values[np.arange(len(X)), :, chosen], rtol=0, atol=1e-7)
