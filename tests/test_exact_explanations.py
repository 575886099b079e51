"""The user's own model file explained exactly as its library explains it, on the models users
really train: values on a threshold, missing values, early stopping, forests, deep trees; and
what we cannot explain refused by name. The reference is the library's own contributions
(LightGBM `pred_contrib`, XGBoost `pred_contribs` over the same iteration range)."""

import lightgbm
import numpy as np
import pytest
import xgboost
from enricher.models import treeshap, usermodels
from enricher.models.usermodels import ModelFileError
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sklearn.datasets import load_wine


def ours(model, X, **options):
    """(attributions, base, margins) for every output: (rows, outputs, features), (rows, outputs)x2."""
    if isinstance(model, lightgbm.Booster):
        name, data = "model.txt", model.model_to_string().encode()
    else:
        name, data = "model.json", bytes(model.save_raw("json"))
    read = usermodels.load(name, data, X.shape[1], **options)
    ens = read.ensemble
    parts = [ens.explain(X, k) for k in range(ens.n_outputs)]
    return (np.stack([p[0] for p in parts], axis=1), np.stack([p[1] for p in parts], axis=1),
            np.stack([p[2] for p in parts], axis=1))


def theirs(model, X, missing=np.nan, iteration_range=(0, 0)):
    """The library's own: (attributions, base, margins) in the same shapes."""
    if isinstance(model, lightgbm.Booster):
        c = np.asarray(model.predict(X, pred_contrib=True))
        m = np.asarray(model.predict(X, raw_score=True))
    else:
        d = xgboost.DMatrix(X, missing=missing, feature_names=model.feature_names, feature_types=model.feature_types,
                            enable_categorical=True)
        c = model.predict(d, pred_contribs=True, iteration_range=iteration_range)
        m = model.predict(d, output_margin=True, iteration_range=iteration_range)
    outputs = m.size // len(X)
    c = c.reshape(len(X), outputs, X.shape[1] + 1)
    return c[:, :, :-1], c[:, :, -1], m.reshape(len(X), outputs)


def assert_same(model, X, atol=None, options=None, **library):
    phi, base, out = ours(model, X, **(options or {}))
    c, c_base, m = theirs(model, X, **library)
    # XGBoost adds in float32 (its own contributions carry that rounding); LightGBM in float64
    atol = atol if atol is not None else (1e-9 if isinstance(model, lightgbm.Booster) else 1e-4)
    scale = 1.0 + np.abs(m).max()
    np.testing.assert_allclose(out, m, rtol=0, atol=atol * scale)
    np.testing.assert_allclose(phi, c, rtol=0, atol=atol * scale)
    np.testing.assert_allclose(base, c_base, rtol=0, atol=atol * scale)
    assert np.abs(phi.sum(axis=2) + base - out).max() < 1e-9 * scale  # additivity, exactly


def lgb(X, y, categorical=(), **params):
    params = {"verbose": -1, "min_data_in_leaf": 5, **params}
    rounds = params.pop("rounds", 30)
    return lightgbm.train(params, lightgbm.Dataset(X, y, categorical_feature=list(categorical) or "auto"), rounds)


def xgb(X, y, missing=np.nan, feature_types=None, **params):
    rounds = params.pop("rounds", 30)
    data = xgboost.DMatrix(X, y, missing=missing, feature_types=feature_types, enable_categorical=True)
    return xgboost.train({"max_depth": 4, **params}, data, rounds)


# -- 1. values on a threshold ---------------------------------------------------------------

def test_values_on_a_lightgbm_threshold_take_the_branch_lightgbm_takes():
    """Wine's measurements have two or three decimals: many rows sit on a split threshold
    (0.81 against 0.8100000000000002); a float32 walk sent some the other way."""
    wine = load_wine()
    X, y = wine.data, (wine.target == 1).astype(float)
    model = lgb(X, y, objective="binary", num_leaves=8, min_data_in_leaf=2)
    thresholds = {float(t) for t in _lgb_thresholds(model)}
    on_threshold = np.array([[X[i, j] in thresholds or np.nextafter(X[i, j], -np.inf) in thresholds
                              for j in range(X.shape[1])] for i in range(len(X))])
    # the data put values next to thresholds: rounding to float32 moves some across
    assert np.any(X.astype(np.float32).astype(np.float64) != X)
    assert_same(model, X)
    # and values exactly on a threshold, and one float64 step to either side
    grid = np.array(sorted(thresholds))
    rows = np.repeat(X[:1], 3 * len(grid), axis=0)
    feature = {float(t): f for f, t in _lgb_split_pairs(model)}
    for k, t in enumerate(grid):
        for d, v in enumerate((t, np.nextafter(t, np.inf), np.nextafter(t, -np.inf))):
            rows[3 * k + d, feature[t]] = v
    assert_same(model, rows)
    assert on_threshold.size  # the wine rows themselves were checked above


def test_epoch_seconds_on_a_threshold_are_not_rounded_away():
    rng = np.random.default_rng(3)
    t = 1_700_000_000 + rng.integers(0, 3_000_000, 2000).astype(np.float64)
    X = np.column_stack([t, rng.normal(size=2000)])
    y = (t % 86_400 > 43_200).astype(float) + X[:, 1]
    model = lgb(X, y, num_leaves=31)
    assert_same(model, X)


def test_xgboost_rounds_rows_to_float32_as_xgboost_does():
    rng = np.random.default_rng(4)
    X = np.round(rng.normal(size=(2000, 4)), 2)
    y = (X[:, 0] > 0.81) + X[:, 1]
    model = xgb(X, y)
    assert_same(model, X)


def _lgb_split_pairs(model):
    dump = model.dump_model()
    out = []

    def walk(node):
        if "split_feature" in node:
            out.append((node["split_feature"], node["threshold"]))
            walk(node["left_child"])
            walk(node["right_child"])
    for tree in dump["tree_info"]:
        walk(tree["tree_structure"])
    return out


def _lgb_thresholds(model):
    return [t for _, t in _lgb_split_pairs(model)]


# -- 2. linear leaves -------------------------------------------------------------------------

def test_a_lightgbm_linear_tree_is_refused_by_name():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(1000, 3))
    model = lgb(X, 2 * X[:, 0] + X[:, 1], linear_tree=True)
    with pytest.raises(ModelFileError, match="linear_tree"):
        usermodels.load("model.txt", model.model_to_string().encode(), 3)


# -- 3. early stopping, forests, multi-output ---------------------------------------------------

def test_an_early_stopped_xgboost_forest_of_three_classes_is_explained_at_its_best_iteration():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(900, 4))
    y = (X[:, 0] + rng.normal(size=900) > 0).astype(int) + (X[:, 1] + rng.normal(size=900) > 0.3)
    model = xgboost.XGBClassifier(n_estimators=60, num_parallel_tree=3, max_depth=4, early_stopping_rounds=3,
                                  learning_rate=0.5, subsample=0.7, colsample_bynode=0.8, eval_metric="mlogloss")
    model.fit(X[:600], y[:600], eval_set=[(X[600:], y[600:])], verbose=False)
    booster = model.get_booster()
    best = int(booster.attributes()["best_iteration"])
    assert best < 59  # it did stop early
    assert_same(booster, X, iteration_range=(0, best + 1))
    # what the estimator's predict gives, which the reference predictions came from
    _, _, margins = ours(booster, X)
    np.testing.assert_array_equal(margins.argmax(axis=1), model.predict(X))
    read = usermodels.load("m.json", bytes(booster.save_raw("json")), 4)
    assert "best_iteration" in read.note
    # every round, when asked for (as Booster.predict)
    assert_same(booster, X, options={"iterations": "all"})


def test_a_lightgbm_random_forest_is_explained_as_its_predict_averages():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(1500, 4))
    model = lgb(X, X[:, 0] + X[:, 1] ** 2, boosting="rf", bagging_freq=1, bagging_fraction=0.6, rounds=20)
    phi, base, out = ours(model, X)
    np.testing.assert_allclose(out[:, 0], model.predict(X), rtol=0, atol=1e-9)
    c, c_base, m = theirs(model, X)  # LightGBM's raw score and contributions of rf sum the trees
    np.testing.assert_allclose(phi * 20, c, rtol=0, atol=1e-8)
    np.testing.assert_allclose(base * 20, c_base, rtol=0, atol=1e-8)


def test_a_multi_output_xgboost_model_is_refused_with_the_reason():
    rng = np.random.default_rng(8)
    X = rng.normal(size=(300, 3))
    Y = np.column_stack([X[:, 0], X[:, 1]])
    for strategy in ("one_output_per_tree", "multi_output_tree"):
        model = xgboost.XGBRegressor(n_estimators=3, multi_strategy=strategy, tree_method="hist").fit(X, Y)
        with pytest.raises(ModelFileError, match="2 targets"):
            usermodels.load("m.json", bytes(model.get_booster().save_raw("json")), 3)


def test_a_dart_model_is_refused_with_the_reason():
    rng = np.random.default_rng(9)
    X = rng.normal(size=(300, 3))
    model = xgb(X, X[:, 0], booster="dart", rounds=5)
    with pytest.raises(ModelFileError, match="dart"):
        usermodels.load("m.json", bytes(model.save_raw("json")), 3)


# -- 4. deep trees ------------------------------------------------------------------------------

def test_deep_xgboost_and_lightgbm_models_are_explained_exactly():
    rng = np.random.default_rng(10)
    X = rng.normal(size=(4000, 16))
    y = np.sin(2 * X[:, :8]).sum(axis=1) + X[:, 8] * X[:, 9] - X[:, 10:].sum(axis=1)
    deep_xgb = xgb(X, y, max_depth=12, rounds=15)
    deep_lgb = lgb(X, y, num_leaves=255, rounds=15)
    read = usermodels.load("m.json", bytes(deep_xgb.save_raw("json")), 16)
    assert read.ensemble.n_path_trees > 0  # the recursion explained what tables could not hold
    for model in (deep_xgb, deep_lgb):
        assert_same(model, X[:300])


def test_a_model_on_120_features_is_explained_exactly():
    rng = np.random.default_rng(11)
    X = rng.normal(size=(3000, 120))
    y = X[:, :60].sum(axis=1) - X[:, 60:].sum(axis=1) + np.sin(X[:, 5] * X[:, 70])
    assert_same(lgb(X, y, num_leaves=63, rounds=20), X[:200])


# -- 5. missing values ----------------------------------------------------------------------------

@pytest.mark.parametrize("params", [{}, {"zero_as_missing": True}, {"use_missing": False}],
                         ids=["nan", "zero_as_missing", "no_missing"])
def test_lightgbm_routes_missing_and_zero_values_as_its_missing_type_says(params):
    rng = np.random.default_rng(12)
    X = rng.normal(size=(2000, 4))
    X[rng.random(2000) < 0.2, 1] = np.nan
    X[rng.random(2000) < 0.2, 2] = 0.0
    y = np.nan_to_num(X[:, 1], nan=3.0) + (X[:, 2] == 0) * 2 + X[:, 0]
    model = lgb(X, y, **params)
    probe = X.copy()
    probe[::3, 0] = np.nan  # missing where training never saw it missing
    probe[1::3, 3] = 0.0
    assert_same(model, probe)


def test_xgboost_routes_nan_its_default_way_and_its_own_missing_value_when_told():
    rng = np.random.default_rng(13)
    X = rng.normal(size=(2000, 4))
    X[rng.random(2000) < 0.2, 1] = np.nan
    X[rng.random(2000) < 0.15, 2] = 1e-8
    y = np.nan_to_num(X[:, 1], nan=3.0) + (X[:, 2] == 1e-8) * 2.5 + X[:, 0]
    assert_same(xgb(X, y), X)
    trained = xgb(X, y, missing=1e-8)
    assert_same(trained, X, options={"missing": 1e-8}, missing=1e-8)
    # without being told, 1e-8 is a number: what XGBoost itself gives on a DMatrix without missing=1e-8
    assert_same(trained, X, missing=np.nan)


# -- the property: random ensembles, depths 1-16, rows on and next to thresholds, missing values ---

def _rows_around_thresholds(rng, X, thresholds, n, categorical=()):
    rows = X[rng.integers(0, len(X), n)].copy()
    for r in range(n):
        for j in range(X.shape[1]):
            pick = rng.random()
            if j in categorical:  # a code seen, unseen, negative, or missing
                if pick < 0.3:
                    rows[r, j] = (np.nan, -1.0, 40.0, float(rng.integers(0, 12)))[rng.integers(4)]
            elif pick < 0.3 and thresholds[j]:
                t = thresholds[j][rng.integers(len(thresholds[j]))]
                rows[r, j] = (t, np.nextafter(t, np.inf), np.nextafter(t, -np.inf),
                              float(np.float32(t)))[rng.integers(4)]
            elif pick < 0.4:
                rows[r, j] = np.nan
            elif pick < 0.45:
                rows[r, j] = 0.0
    return rows


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(library=st.sampled_from(["lightgbm", "xgboost"]), depth=st.integers(1, 16), trees=st.integers(1, 12),
       features=st.integers(1, 12), classes=st.sampled_from([1, 3]), seed=st.integers(0, 2**31 - 1),
       missing_rate=st.sampled_from([0.0, 0.1]), decimals=st.sampled_from([1, 2, 6]),
       table_limit=st.sampled_from([0, 2, 4, treeshap.TABLE_PATH_FEATURES]), with_category=st.booleans())
def test_attributions_equal_the_librarys_for_random_ensembles(library, depth, trees, features, classes, seed,
                                                               missing_rate, decimals, table_limit, with_category):
    """`table_limit`: trees with longer paths go to the recursion, so both ways are checked;
    `with_category`: the first feature is categorical (codes 0-11), split by set membership."""
    rng = np.random.default_rng(seed)
    X = np.round(rng.normal(size=(1500, features)) * rng.uniform(0.1, 1000), decimals)
    categorical = (0,) if with_category else ()
    if with_category:
        X[:, 0] = rng.integers(0, 12, len(X))
    X[rng.random(X.shape) < missing_rate] = np.nan
    signal = np.nan_to_num(X, nan=1.0) @ rng.normal(size=features) + np.sin(np.nan_to_num(X[:, 0]))
    if classes > 1:
        y = np.digitize(signal, np.quantile(signal, [0.33, 0.66]))
        params = {"objective": "multiclass", "num_class": 3} if library == "lightgbm" else \
            {"objective": "multi:softprob", "num_class": 3}
    else:
        y = signal
        params = {}
    if library == "lightgbm":
        model = lgb(X, y, categorical, num_leaves=min(2 ** depth, 255), max_depth=depth, rounds=trees,
                    min_data_in_leaf=2, zero_as_missing=bool(seed % 2), min_data_per_group=5, cat_smooth=1, **params)
        thresholds = {}
        for f, t in _lgb_split_pairs(model):
            if f not in categorical:
                thresholds.setdefault(f, []).append(float(t))
    else:
        types = ["c" if j in categorical else "q" for j in range(features)]
        model = xgb(X, y, max_depth=depth, rounds=trees, min_child_weight=0, feature_types=types,
                    max_cat_to_onehot=1, tree_method="hist", **params)
        thresholds = {}
        for tree in model.trees_to_dataframe().itertuples():
            if tree.Feature != "Leaf" and int(tree.Feature[1:]) not in categorical:
                thresholds.setdefault(int(tree.Feature[1:]), []).append(float(tree.Split))
    rows = _rows_around_thresholds(rng, X, [thresholds.get(j, []) for j in range(features)], 120, categorical)
    default = treeshap.TABLE_PATH_FEATURES
    treeshap.TABLE_PATH_FEATURES = table_limit
    try:
        assert_same(model, rows)
    finally:
        treeshap.TABLE_PATH_FEATURES = default


# -- end to end: registered, trained, explained in a batch -------------------------------------

def _trained(tmp_path, doc, reference, model_path, config=None):
    """Registered with its model file, trained as a user's would be: (quality, fitted artifact, spec)."""
    from enricher.models import ENRICHMENTS
    from enricher.models.registry import ModelRegistry
    from enricher.pipelines.train import train

    from enricher.config import Settings

    settings = Settings.from_env(env={}, data_dir=str(tmp_path / "data"), broker="kafka://127.0.0.1:1")
    registry = ModelRegistry(settings.registry_dir)
    registry.register("own", doc, reference, model_path)
    registry.set_enrichment("own", "explainability", True, config or {})
    train(registry, settings.artifacts(), "own", log=lambda m: None)
    artifact = settings.artifacts().load("own", "explainability")
    spec = registry.get("own")
    fitted = ENRICHMENTS["explainability"].load(spec, artifact.manifest, artifact.blobs)
    return artifact.manifest.parameters["quality"], fitted, spec


def _train_and_explain(tmp_path, X, prediction, doc, model_path, config=None):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from enricher.models.enrichment import InferenceBatch

    names = [f["name"] for f in doc["features"]]
    reference = tmp_path / "reference.parquet"
    pq.write_table(pa.table({**{n: X[:, i] for i, n in enumerate(names)}, "prediction": prediction}), reference)
    quality, fitted, spec = _trained(tmp_path, doc, reference, model_path, config)
    out = fitted.transform(InferenceBatch.from_reference(spec, pq.read_table(reference)))
    phi = np.column_stack([out[f"explanation_{n}"].to_numpy() for n in names])
    return quality, phi, out["explanation_output"].to_numpy()


def test_a_users_lightgbm_model_on_wine_is_explained_exactly_after_training(tmp_path):
    wine = load_wine()
    X, y = wine.data, (wine.target == 1).astype(int)
    model = lightgbm.LGBMClassifier(n_estimators=40, num_leaves=8, min_child_samples=3, verbose=-1).fit(X, y)
    path = tmp_path / "model.txt"
    model.booster_.save_model(str(path))
    doc = {"task": "binary_classification", "prediction_type": "numeric",
           "features": [{"name": f"w{i}", "type": "numeric"} for i in range(X.shape[1])]}
    quality, phi, output = _train_and_explain(tmp_path, X, model.predict_proba(X)[:, 1], doc, path)
    assert quality["fidelity"] > 0.999999 and quality["checked_against"]["library"].startswith("lightgbm")
    c = np.asarray(model.predict(X, pred_contrib=True))
    np.testing.assert_allclose(phi, c[:, :-1], rtol=0, atol=1e-9)
    np.testing.assert_allclose(output, model.predict(X, raw_score=True), rtol=0, atol=1e-9)


def test_an_early_stopped_xgboost_classifier_is_trained_and_explained_at_its_best_iteration(tmp_path):
    rng = np.random.default_rng(14)
    X = rng.normal(size=(1200, 4))
    y = (X[:, 0] + rng.normal(size=1200) > 0).astype(int) + (X[:, 1] + rng.normal(size=1200) > 0.3)
    model = xgboost.XGBClassifier(n_estimators=80, num_parallel_tree=2, max_depth=4, early_stopping_rounds=3,
                                  learning_rate=0.5, eval_metric="mlogloss")
    model.fit(X[:800], y[:800], eval_set=[(X[800:], y[800:])], verbose=False)
    best = model.best_iteration
    path = tmp_path / "model.json"
    model.save_model(str(path))
    doc = {"task": "multiclass_classification", "prediction_type": "categorical",
           "features": [{"name": f"x{i}", "type": "numeric"} for i in range(4)]}
    quality, phi, output = _train_and_explain(tmp_path, X, model.predict(X).astype(str), doc, path)
    assert quality["fidelity"] == 1.0 and "best_iteration" in quality["note"]
    margins = model.get_booster().predict(xgboost.DMatrix(X), output_margin=True, iteration_range=(0, best + 1))
    chosen = margins.argmax(axis=1)
    c = model.get_booster().predict(xgboost.DMatrix(X), pred_contribs=True, iteration_range=(0, best + 1))
    c = c[np.arange(len(X)), chosen]
    np.testing.assert_allclose(phi, c[:, :-1], rtol=0, atol=1e-4)
    np.testing.assert_allclose(output, margins[np.arange(len(X)), chosen], rtol=0, atol=1e-4)


# -- 6. categorical splits ------------------------------------------------------------------------

def _categorical_frame(n=3000, seed=15):
    import pandas as pd

    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"x": np.round(rng.normal(size=n), 2),
                       "color": pd.Categorical(rng.choice(["red", "green", "blue", "teal", "pink", "gray"], n)),
                       "size": pd.Categorical(rng.choice([3, 1, 2], n))})
    y = df.x + df.color.isin(["red", "pink"]) * 2.0 + (df["size"] == 2) + (df.color == "teal") * df.x
    return df, y.to_numpy()


@pytest.mark.parametrize("library", ["lightgbm", "xgboost"])
def test_categorical_splits_are_walked_as_the_library_walks_them(library):
    df, y = _categorical_frame()
    codes = np.column_stack([df.x, df.color.cat.codes, df["size"].cat.codes]).astype(np.float64)
    probe = codes[:400].copy()
    probe[::7, 1] = np.nan   # missing
    probe[::11, 2] = np.nan
    probe[::13, 1] = 9       # a code past every bitset
    if library == "lightgbm":
        model = lightgbm.LGBMRegressor(n_estimators=25, min_data_per_group=5, cat_smooth=1, verbose=-1).fit(df, y)
        read = usermodels.load("m.txt", model.booster_.model_to_string().encode(), 3)
        assert_same(model.booster_, probe)
    else:
        model = xgboost.XGBRegressor(n_estimators=25, enable_categorical=True, tree_method="hist", max_depth=4,
                                     max_cat_to_onehot=1).fit(df, y)
        read = usermodels.load("m.json", bytes(model.get_booster().save_raw("json")), 3)
        booster = model.get_booster()
        d = xgboost.DMatrix(probe, feature_names=booster.feature_names, feature_types=booster.feature_types,
                            enable_categorical=True)
        phi, base, out = ours(booster, probe)
        np.testing.assert_allclose(out[:, 0], booster.predict(d, output_margin=True), rtol=0, atol=1e-5)
        np.testing.assert_allclose(phi[:, 0], booster.predict(d, pred_contribs=True)[:, :-1], rtol=0, atol=1e-5)
    assert read.categories == {1: ["blue", "gray", "green", "pink", "red", "teal"], 2: ["1", "2", "3"]}


@pytest.mark.parametrize("library", ["lightgbm", "xgboost"])
def test_a_categorical_schema_feature_reaches_the_models_own_codes_end_to_end(tmp_path, library):
    """The message sends 'teal'; the model was trained on pandas' code for teal. A category the
    model never saw reads as missing, as the library reads it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    df, y = _categorical_frame()
    if library == "lightgbm":
        model = lightgbm.LGBMRegressor(n_estimators=25, min_data_per_group=5, cat_smooth=1, verbose=-1).fit(df, y)
        path = tmp_path / "model.txt"
        model.booster_.save_model(str(path))
    else:
        model = xgboost.XGBRegressor(n_estimators=25, enable_categorical=True, tree_method="hist", max_depth=4,
                                     max_cat_to_onehot=1).fit(df, y)
        path = tmp_path / "model.json"
        model.save_model(str(path))
    doc = {"task": "regression", "features": [{"name": "x", "type": "numeric"},
                                              {"name": "color", "type": "categorical"},
                                              {"name": "size", "type": "categorical"}]}
    sent = df.copy()
    sent["color"] = sent.color.astype(str)
    sent["size"] = sent["size"].astype(str)
    sent.loc[::9, "color"] = "mauve"  # a colour the model never saw
    reference = tmp_path / "reference.parquet"
    pq.write_table(pa.table({"x": df.x, "color": sent.color, "size": sent["size"], "prediction": model.predict(df)}),
                   reference)
    from enricher.models.enrichment import InferenceBatch

    quality, fitted, spec = _trained(tmp_path, doc, reference, path)
    out = fitted.transform(InferenceBatch.from_reference(spec, pq.read_table(reference)))
    phi = np.column_stack([out[f"explanation_{n}"].to_numpy() for n in ("x", "color", "size")])
    codes = np.column_stack([df.x, df.color.cat.codes, df["size"].cat.codes]).astype(np.float64)
    codes[::9, 1] = np.nan  # what the library makes of a category it never saw
    if library == "lightgbm":
        c = model.booster_.predict(codes, pred_contrib=True)
        atol = 1e-9
    else:
        booster = model.get_booster()
        c = booster.predict(xgboost.DMatrix(codes, feature_names=booster.feature_names,
                                            feature_types=booster.feature_types, enable_categorical=True),
                            pred_contribs=True)
        atol = 1e-5
    np.testing.assert_allclose(phi, c[:, :-1], rtol=0, atol=atol)
    assert quality["checked_against"]["library"].startswith(library)


def test_a_categorical_schema_feature_the_model_treats_as_a_number_is_refused_at_registration(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from enricher.models.registry import ModelRegistry
    from enricher.models.spec import SpecError

    rng = np.random.default_rng(16)
    X = rng.normal(size=(500, 2))
    model = lgb(X, X[:, 0])
    path = tmp_path / "model.txt"
    model.save_model(str(path))
    reference = tmp_path / "r.parquet"
    pq.write_table(pa.table({"a": X[:, 0], "b": [str(v) for v in X[:, 1]], "prediction": X[:, 0]}), reference)
    doc = {"task": "regression", "features": [{"name": "a", "type": "numeric"}, {"name": "b", "type": "categorical"}]}
    with pytest.raises(SpecError, match="'b' is categorical in the schema, but not in the model file"):
        ModelRegistry(tmp_path / "registry").register("m", doc, reference, path)
