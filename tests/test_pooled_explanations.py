"""Explanations over many models in one TreeSHAP call: explainability artifacts held in pools
explain the rows of many models together, and every attribution, base value and output
equals what the model's own artifact gives (to 1e-12), on the models users really train
(LightGBM with categorical splits and missing values, XGBoost of several classes, values
on the thresholds) and on our surrogates of every kind (score, classes, another layout,
sample rates)."""

import lightgbm
import numpy as np
import pyarrow as pa
import pytest
import xgboost
from enricher.models import ENRICHMENTS, usermodels
from enricher.models.encoding import FeatureEncoder
from enricher.models.enrichment import InferenceBatch
from enricher.models.explainability import ExplainabilityArtifact
from enricher.models.reference import normalise
from enricher.models.spec import ModelSpec
from enricher.models.treepool import EnsemblePool, can_pool

from enricher import sample
from tests.test_pooled_scoring import OTHER, hostile_batch, other_reference

EX = ENRICHMENTS["explainability"]


def read(model) -> "usermodels.TreeEnsemble":
    if isinstance(model, lightgbm.Booster):
        name, data = "model.txt", model.model_to_string().encode()
    else:
        name, data = "model.json", bytes(model.save_raw("json"))
    return usermodels.load(name, data, 3).ensemble


def frame(n: int, seed: int):
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.round(rng.normal(size=n), 2), rng.integers(0, 6, n), rng.integers(0, 3, n)]).astype(float)
    y = X[:, 0] + np.isin(X[:, 1], [0, 4]) * 2.0 + (X[:, 2] == 2) + (X[:, 1] == 3) * X[:, 0]
    X[rng.random(n) < 0.05, 0] = np.nan
    return X, y


def probe(ens, X: np.ndarray, seed: int) -> np.ndarray:
    """Rows with missing values, unseen codes, and values exactly on the ensemble's thresholds."""
    rng = np.random.default_rng(seed)
    rows = X[rng.integers(0, len(X), 60)].copy()
    on = ens.threshold[(ens.left >= 0) & (ens.feature == 0)]
    if len(on):
        rows[::3, 0] = rng.choice(on, len(rows[::3]))
    rows[::7, 1] = np.nan
    rows[::11, 1] = 9  # a category code past every bitset
    rows[::13, 2] = np.nan
    return rows


def lightgbm_ensembles():
    """Regressors on three features: categorical splits, missing values routed several ways."""
    out = []
    for seed, params in enumerate([{}, {"use_missing": False}, {"zero_as_missing": True}, {"num_leaves": 4}]):
        X, y = frame(2000, seed)
        data = lightgbm.Dataset(X, y, categorical_feature=[1, 2] if seed % 2 == 0 else "auto")
        model = lightgbm.train({"verbose": -1, "min_data_in_leaf": 5, "min_data_per_group": 5, "cat_smooth": 1,
                                **params}, data, 15 + 5 * seed)
        out.append((read(model), X))
    return out


def xgboost_ensembles():
    """Classifiers of three classes (three outputs), one early-stopped, one deep."""
    out = []
    for seed, params in enumerate([{"max_depth": 3}, {"max_depth": 5, "early": True}, {"max_depth": 10}]):
        X, y = frame(1500, 10 + seed)
        classes = np.digitize(y, np.quantile(y, [0.33, 0.66]))
        early = params.pop("early", False)
        train = xgboost.DMatrix(X[:1000], classes[:1000])
        kw = {"evals": [(xgboost.DMatrix(X[1000:], classes[1000:]), "v")], "early_stopping_rounds": 3,
              "verbose_eval": False} if early else {}
        model = xgboost.train({"objective": "multi:softprob", "num_class": 3, **params}, train, 20, **kw)
        out.append((read(model), X))
    return out


def deep(features: int = 16):
    """A depth-12 XGBoost model on 16 features: paths too long for tables (the recursion's)."""
    rng = np.random.default_rng(10)
    X = rng.normal(size=(3000, features))
    y = np.sin(2 * X[:, :8]).sum(axis=1) + X[:, 8] * X[:, 9] - X[:, 10:].sum(axis=1)
    model = xgboost.train({"max_depth": 12}, xgboost.DMatrix(X, y), 10)
    ensemble = usermodels.load("model.json", bytes(model.save_raw("json")), features).ensemble
    assert ensemble.n_path_trees > 0
    return ensemble


def test_pooled_ensembles_explain_every_row_as_each_ensemble_alone():
    for poolable in (lightgbm_ensembles(), xgboost_ensembles()):
        assert all(can_pool(e) for e, _ in poolable)
        rows = [probe(e, X, seed=k) for k, (e, X) in enumerate(poolable)]
        own = []
        for (e, _), X in zip(poolable, rows):  # before pooling: the members' arrays are their own
            outputs = np.arange(len(X)) % e.n_outputs
            own.append((e.explain(X, outputs), e.predict_raw(X), outputs))
        pool = EnsemblePool([e for e, _ in poolable])
        order = [0, 2, 1, 0, len(poolable) - 1]  # out of order, a member in two runs
        X = np.concatenate([rows[m] for m in order])
        member = np.repeat(order, [len(rows[m]) for m in order])
        outputs = np.concatenate([own[m][2] for m in order])
        phi, base, out = pool.explain(X, member, outputs)
        np.testing.assert_allclose(phi, np.concatenate([own[m][0][0] for m in order]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(base, np.concatenate([own[m][0][1] for m in order]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(out, np.concatenate([own[m][0][2] for m in order]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(pool.predict_raw(X, member), np.concatenate([own[m][1] for m in order]),
                                   rtol=0, atol=1e-12)
        # the members now read the pool's arrays (held once), and explain alone as before
        for k, ((e, _), X) in enumerate(zip(poolable, rows)):
            assert np.shares_memory(e.tables["table"], pool.table) and np.shares_memory(e.threshold, pool.threshold)
            again = e.explain(X, own[k][2])
            for a, b in zip(again, own[k][0]):
                np.testing.assert_array_equal(a, b)


def test_a_pool_refuses_ensembles_it_cannot_walk_as_one():
    (lg, _), (lg2, _) = lightgbm_ensembles()[:2]
    xg = [e for e, _ in xgboost_ensembles()]
    with pytest.raises(ValueError, match="same outputs"):
        EnsemblePool([lg, xg[0]])  # one output and three, float64 rows and float32
    with pytest.raises(ValueError, match="recursion"):
        EnsemblePool([deep()])
    pool = EnsemblePool([lg, lg2])
    with pytest.raises(ValueError, match="member index"):
        pool.explain(np.zeros((2, 3)), np.array([0, 2]))


# -- artifacts: our surrogates, and a deep user model -------------------------------------------

def surrogate(model_id: str, schema: dict, reference: pa.Table, **config):
    spec = ModelSpec.from_json(model_id, schema)
    fitted = EX.fit(spec, normalise(spec, reference), {"n_estimators": 12, "max_depth": 4, "min_fidelity": -1,
                                                      **config})
    fitted.surrogate = None
    return spec, fitted, reference


def with_classes(reference: pa.Table, labels: list[str], cuts: list[float]) -> pa.Table:
    p = reference.column("prediction").to_numpy()
    classes = np.array(labels)[np.digitize(p, cuts)]
    return reference.set_column(reference.column_names.index("prediction"), "prediction",
                                pa.array(classes)).drop_columns(["label"])


def artifacts():
    models = []
    for i, rate in enumerate([1.0, 1.0, 0.5, 0.3]):  # a score, sample rates
        models.append(surrogate(f"s{i}", sample.SCHEMA, sample.reference_table(800, seed=20 + i), sample_rate=rate))
    for i in range(2):  # another layout
        models.append(surrogate(f"o{i}", OTHER, other_reference(700, seed=30 + i)))
    three = {**sample.SCHEMA, "task": "multiclass_classification"}
    for i in range(2):  # three classes
        ref = with_classes(sample.reference_table(900, seed=40 + i), ["low", "mid", "high"], [0.4, 0.6])
        models.append(surrogate(f"c{i}", three, ref))
    two = {**sample.SCHEMA, "prediction_type": "categorical"}
    for i in range(2):  # two class labels (one output)
        ref = with_classes(sample.reference_table(900, seed=50 + i), ["no", "yes"], [0.5])
        models.append(surrogate(f"b{i}", two, ref, sample_rate=0.6 if i else 1.0))
    # a user's deep XGBoost model, on 16 features: trees too deep for tables
    schema = {"task": "regression", "features": [{"name": f"x{j}", "type": "numeric"} for j in range(16)]}
    spec = ModelSpec.from_json("deep", schema)
    ref = pa.table({f"x{j}": np.random.default_rng(j).normal(size=300) for j in range(16)} |
                   {"prediction": np.zeros(300)})
    encoder = FeatureEncoder.fit(spec, normalise(spec, ref), categorical="code", nulls="nan")
    models.append((spec, ExplainabilityArtifact(encoder, deep(), None, dict(models[0][1].parameters), {}), ref))
    return models


def prediction_of(spec: ModelSpec, batch, reference: pa.Table, seed: int):
    """Predictions as a producer sends them: a class the model knows, or one it never showed."""
    if spec.prediction_type == "numeric":
        return batch.prediction
    rng = np.random.default_rng(seed)
    known = sorted(set(reference.column("prediction").to_pylist()))
    told = rng.choice([*known, "never-seen"], batch.num_rows).tolist()
    told[::9] = [None] * len(told[::9])
    return pa.array(told, pa.string())


def test_pooled_explanations_equal_each_models_own_artifact():
    models = artifacts()
    pools = EX.pool([a for _, a, _ in models])
    # a pool per layout and kind of output; the deep model is in none (it explains on its own)
    assert sorted(len(idx) for _, idx in pools) == [2, 2, 2, 4]
    assert sorted(i for _, idx in pools for i in idx) == list(range(len(models) - 1))
    for pool, idx in pools:
        order = [idx[k % len(idx)] for k in (0, 1, 0, 3, 2, 1)]
        batches = []
        for k, i in enumerate(order):
            spec, _, ref = models[i]
            batch = hostile_batch(spec, normalise(spec, ref), 40 + 7 * k, seed=k)
            batch.prediction = prediction_of(spec, batch, ref, seed=k) if spec.prediction_type != "numeric" else \
                pa.array(np.random.default_rng(k).random(batch.num_rows))
            batch.inference_id = pa.array([f"{i}-{k}-{r}" for r in range(batch.num_rows)])
            batches.append(batch)
        member = np.repeat([idx.index(i) for i in order], [b.num_rows for b in batches])
        pooled = pool.transform(InferenceBatch.concat(batches, pool.features), member)
        own = [models[i][1].transform(b) for i, b in zip(order, batches)]
        assert set(pooled) == set(own[0])
        for col in pooled:
            mine = pa.concat_arrays([o[col] for o in own])
            assert pooled[col].is_null().equals(mine.is_null()), col  # the same rows sampled
            np.testing.assert_allclose(pooled[col].to_numpy(zero_copy_only=False),
                                       mine.to_numpy(zero_copy_only=False), rtol=0, atol=1e-12, err_msg=col)
        assert pooled["explanation_output"].null_count < len(member)
