"""The user's own tree model, registered with the model and explained exactly (no surrogate),
against XGBoost's and LightGBM's own contributions; pickles refused."""

import pickle

import lightgbm
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xgboost
from enricher.models import ENRICHMENTS
from enricher.models.enrichment import InferenceBatch
from enricher.models.registry import ModelRegistry
from enricher.models.spec import SpecError
from enricher.pipelines.train import train
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from enricher.config import Settings
from enricher.control.plane import ControlPlane
from enricher.errors import RequestError

EX = ENRICHMENTS["explainability"]
N_FEATURES = 6
NAMES = [f"x{i}" for i in range(N_FEATURES)]


def data(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    y = 2 * X[:, 0] + np.sin(X[:, 1]) + X[:, 2] * X[:, 3]
    return X, y


def schema(task, prediction_type="numeric"):
    return {"task": task, "prediction_type": prediction_type,
            "features": [{"name": n, "type": "numeric"} for n in NAMES]}


def fitted_models(kind):
    X, y = data()
    common = dict(n_estimators=40, max_depth=4)
    from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor

    if kind == "regression":
        models = {"json": xgboost.XGBRegressor(**common).fit(X, y),
                  "txt": lightgbm.LGBMRegressor(**common, num_leaves=16, verbose=-1).fit(X, y),
                  "skops": GradientBoostingRegressor(**common, random_state=0).fit(X, y)}
    elif kind == "binary":
        models = {"json": xgboost.XGBClassifier(**common).fit(X, y > 0),
                  "txt": lightgbm.LGBMClassifier(**common, num_leaves=16, verbose=-1).fit(X, y > 0),
                  "skops": GradientBoostingClassifier(**common, random_state=0).fit(X, y > 0)}
    else:
        classes = np.digitize(y, [-1.0, 1.0])
        models = {"json": xgboost.XGBClassifier(**common).fit(X, classes),
                  "txt": lightgbm.LGBMClassifier(**common, num_leaves=16, verbose=-1).fit(X, classes),
                  "skops": GradientBoostingClassifier(**common, random_state=0).fit(X, classes)}
    return X, models


def contributions(model, fmt, X, outputs):
    """The library's own attributions and margins: (rows, outputs, features + 1), (rows, outputs)."""
    if fmt == "skops":  # scikit-learn's own have no contributions: shap's are the reference (not for multiclass)
        import shap

        m = model.decision_function(X) if hasattr(model, "decision_function") else model.predict(X)
        if outputs > 1:
            return None, np.asarray(m).reshape(len(X), outputs)
        explainer = shap.TreeExplainer(model)
        base = float(np.ravel(explainer.expected_value)[0])
        c = np.column_stack([explainer.shap_values(X), np.full(len(X), base)])
        return c.reshape(len(X), 1, N_FEATURES + 1), np.asarray(m).reshape(len(X), 1)
    if fmt in ("json", "ubj"):
        booster = model.get_booster()
        c = booster.predict(xgboost.DMatrix(X), pred_contribs=True)
        m = booster.predict(xgboost.DMatrix(X), output_margin=True)
    else:
        c = np.asarray(model.predict(X, pred_contrib=True))
        m = model.predict(X, raw_score=True)
    return c.reshape(len(X), outputs, N_FEATURES + 1), np.asarray(m).reshape(len(X), outputs)


@pytest.mark.parametrize("kind", ["regression", "binary", "multiclass"])
@pytest.mark.parametrize("fmt", ["json", "ubj", "txt", "skops"])
def test_a_registered_model_file_is_explained_exactly_as_its_library_does(tmp_path, kind, fmt):
    X, models = fitted_models(kind)
    model = models["json" if fmt == "ubj" else fmt]
    path = tmp_path / f"model.{fmt}"
    if fmt == "skops":
        import skops.io

        skops.io.dump(model, path)
    else:
        (model.booster_ if fmt == "txt" else model.get_booster()).save_model(str(path))
    if kind == "regression":
        prediction, doc = model.predict(X), schema("regression")
    elif kind == "binary":
        prediction, doc = model.predict_proba(X)[:, 1], schema("binary_classification")
    else:
        prediction, doc = model.predict(X).astype(str), schema("multiclass_classification", "categorical")
    reference = tmp_path / "reference.parquet"
    pq.write_table(pa.table({**{n: X[:, i] for i, n in enumerate(NAMES)}, "prediction": prediction}), reference)
    settings = Settings.from_env(env={}, data_dir=str(tmp_path / "data"), broker="kafka://127.0.0.1:1")
    registry = ModelRegistry(settings.registry_dir)
    registry.register("own", doc, reference, path)
    registry.set_enrichment("own", "explainability", True)
    train(registry, settings.artifacts(), "own", log=lambda m: None)
    artifact = settings.artifacts().load("own", "explainability")
    quality = artifact.manifest.parameters["quality"]
    assert quality["explains"] == "model_file" and quality["fidelity"] > 0.999  # it is the model that predicted
    spec = registry.get("own")
    fitted = EX.load(spec, artifact.manifest, artifact.blobs)
    rows = pq.read_table(reference).slice(0, 400)
    out = fitted.transform(InferenceBatch.from_reference(spec, rows))
    phi = np.column_stack([out[f"explanation_{n}"].to_numpy() for n in NAMES])
    outputs = 3 if kind == "multiclass" else 1
    c, margins = contributions(model, fmt, X[:400], outputs)
    chosen = margins.argmax(axis=1) if outputs > 1 else np.zeros(400, int)
    margins = margins[np.arange(400), chosen]
    # XGBoost sums in float32 (its own outputs carry ~1e-6 of rounding); LightGBM and scikit-learn in float64
    tolerance = 2e-5 if fmt in ("json", "ubj") else 1e-9
    if c is not None:
        c = c[np.arange(400), chosen]
        np.testing.assert_allclose(phi, c[:, :-1], rtol=0, atol=tolerance)
        np.testing.assert_allclose(out["explanation_base_value"].to_numpy(), c[:, -1], rtol=0, atol=tolerance)
    np.testing.assert_allclose(out["explanation_output"].to_numpy(), margins, rtol=0, atol=tolerance)
    assert np.abs(phi.sum(axis=1) + out["explanation_base_value"].to_numpy()
                  - out["explanation_output"].to_numpy()).max() < 1e-9


def _reference(tmp_path, X, prediction):
    path = tmp_path / "reference.parquet"
    pq.write_table(pa.table({**{n: X[:, i] for i, n in enumerate(NAMES)}, "prediction": prediction}), path)
    return path


def test_ubjson_decodes_what_xgboost_writes_and_refuses_what_it_does_not(tmp_path):
    import json

    from enricher.models.usermodels import ubjson

    X, models = fitted_models("binary")
    booster = models["json"].get_booster()
    booster.save_model(str(tmp_path / "m.json"))
    booster.save_model(str(tmp_path / "m.ubj"))
    as_json = json.loads((tmp_path / "m.json").read_text())
    as_ubj = ubjson((tmp_path / "m.ubj").read_bytes())
    tj, tu = as_json["learner"]["gradient_booster"]["model"]["trees"][3], \
        as_ubj["learner"]["gradient_booster"]["model"]["trees"][3]
    assert list(tu["left_children"]) == tj["left_children"]
    np.testing.assert_allclose(tu["split_conditions"], tj["split_conditions"], rtol=1e-7)
    assert as_ubj["learner"]["objective"]["name"] == "binary:logistic"
    for bad in [b"[", b"{i\x03ab", b"[$d#i\x05\x00", b"X", b"[" * 100 + b"]" * 100, b"Si\x05ab"]:
        with pytest.raises(ValueError):
            ubjson(bad)


def test_a_skops_file_holding_anything_else_is_refused_naming_it(tmp_path):
    import skops.io
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    X, models = fitted_models("regression")
    reference = _reference(tmp_path, X, models["skops"].predict(X))
    path = tmp_path / "model.skops"
    skops.io.dump(make_pipeline(FunctionTransformer(np.log1p), models["skops"]), path)
    with pytest.raises(SpecError, match="types we do not load: numpy.log1p|holds a scikit-learn Pipeline"):
        ModelRegistry(tmp_path / "registry").register("own", schema("regression"), reference, path)


def test_a_pickle_is_refused_by_its_name_and_by_its_content(tmp_path):
    X, models = fitted_models("regression")
    reference = _reference(tmp_path, X, models["txt"].predict(X))
    registry = ModelRegistry(tmp_path / "registry")
    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(pickle.dumps(models["txt"]))
    with pytest.raises(SpecError, match="a pickle is refused"):
        registry.register("own", schema("regression"), reference, pkl)
    disguised = tmp_path / "model.json"
    disguised.write_bytes(pickle.dumps(models["txt"]))
    with pytest.raises(SpecError, match="is a pickle"):
        registry.register("own", schema("regression"), reference, disguised)
    assert "own" not in registry.ids()  # nothing registered
    control = ControlPlane(registry, None)
    with pytest.raises(RequestError) as err:
        control.put_model("own", {"schema": schema("regression"), "reference": str(reference), "model_file": str(pkl)})
    assert err.value.field == "model_file" and "pickle is refused" in str(err.value)


def test_a_model_file_that_did_not_make_the_reference_predictions_is_refused_by_fidelity(tmp_path):
    X, models = fitted_models("regression")
    path = tmp_path / "model.txt"
    models["txt"].booster_.save_model(str(path))
    other = np.random.default_rng(5).normal(size=len(X))  # predictions this model never made
    reference = _reference(tmp_path, X, other)
    registry = ModelRegistry(tmp_path / "registry")
    registry.register("own", schema("regression"), reference, path)
    from enricher.models.enrichment import ModelFile
    from enricher.models.reference import normalise

    spec = registry.get("own")
    fitted = EX.fit(spec, normalise(spec, pq.read_table(reference)), {}, ModelFile("model.txt", path.read_bytes()))
    with pytest.raises(ValueError, match="below min_fidelity"):
        EX.check_quality(fitted.quality, {})


def test_a_model_file_that_does_not_fit_the_schema_is_refused_at_registration(tmp_path):
    X, models = fitted_models("regression")
    path = tmp_path / "model.txt"
    models["txt"].booster_.save_model(str(path))
    reference = _reference(tmp_path, X, models["txt"].predict(X))
    registry = ModelRegistry(tmp_path / "registry")
    fewer = {"task": "regression", "features": [{"name": n, "type": "numeric"} for n in NAMES[:4]]}
    with pytest.raises(SpecError, match="has 6 features, the schema 4"):
        registry.register("own", fewer, reference, path)
    categorical = {**schema("regression"), "features": schema("regression")["features"][:5]
                   + [{"name": "x5", "type": "categorical"}]}
    with pytest.raises(SpecError, match="categorical in the schema, but not in the model file"):
        registry.register("own", categorical, reference, path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"learner": {}}')
    with pytest.raises(SpecError, match="not a xgboost-json model we can read"):
        registry.register("own", schema("regression"), reference, broken)
    with pytest.raises(SpecError, match="use an XGBoost JSON"):
        registry.register("own", schema("regression"), reference, tmp_path / "reference.parquet")


def _small_files():
    import tempfile
    from pathlib import Path

    X, y = data(400)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        xgboost.XGBRegressor(n_estimators=3, max_depth=2).fit(X, y).get_booster().save_model(f"{tmp}/m.json")
        xgboost.XGBRegressor(n_estimators=3, max_depth=2).fit(X, y).get_booster().save_model(f"{tmp}/m.ubj")
        lightgbm.LGBMRegressor(n_estimators=3, num_leaves=4, verbose=-1).fit(X, y).booster_.save_model(f"{tmp}/m.txt")
        for name in ("m.json", "m.ubj", "m.txt"):
            out[name] = Path(tmp, name).read_bytes()
    return out


SMALL = _small_files()


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for where, value in edits:
        if b:
            b[where % len(b)] = value
    return bytes(b)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(SMALL)), edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)),
                                                          min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 1 << 16)))
def test_a_damaged_model_file_is_refused_with_a_reason_never_a_crash(name, edits, cut):
    from enricher.models.usermodels import ModelFileError, load

    data = _mutate(SMALL[name], edits)
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    try:
        model = load(name, data, N_FEATURES)
    except ModelFileError as exc:
        assert str(exc)
        return
    # a damaged file that still loads is still a valid ensemble: it explains, additively
    # (to the precision of the largest term: a damaged leaf may hold 1e16)
    phi, base, out = model.ensemble.explain(np.zeros((3, N_FEATURES), np.float32))
    scale = max(1.0, *(float(np.abs(a).max()) for a in (out, base, phi)))
    assert np.allclose(phi.sum(axis=1) + base, out, rtol=0, atol=1e-9 * scale)
    assert phi.shape == (3, N_FEATURES)


def test_a_tree_with_an_orphan_or_a_node_of_two_parents_is_refused():
    """Found by the fuzzer: a split turned leaf leaves its subtree unreachable; the
    expected value then counted leaves no row reaches, and explanations did not add up."""
    import json

    from enricher.models.usermodels import ModelFileError, load

    model = json.loads(SMALL["m.json"])
    tree = model["learner"]["gradient_booster"]["model"]["trees"][1]
    orphaned = json.loads(json.dumps(model))
    t = orphaned["learner"]["gradient_booster"]["model"]["trees"][1]
    t["left_children"][0] = t["right_children"][0] = -1
    with pytest.raises(ModelFileError, match="tree 1: node 1 has 0 parents"):
        load("m.json", json.dumps(orphaned).encode(), N_FEATURES)
    shared = json.loads(json.dumps(model))
    t = shared["learner"]["gradient_booster"]["model"]["trees"][1]
    inner = [i for i, c in enumerate(tree["left_children"]) if c >= 0 and i > 0]
    t["right_children"][inner[0]] = t["left_children"][inner[0]]
    with pytest.raises(ModelFileError, match="parents"):
        load("m.json", json.dumps(shared).encode(), N_FEATURES)
    assert load("m.json", SMALL["m.json"], N_FEATURES).ensemble.n_trees == 3




def test_a_model_file_may_come_from_an_object_store(tmp_path, s3):
    import boto3

    X, models = fitted_models("regression")
    path = tmp_path / "model.txt"
    models["txt"].booster_.save_model(str(path))
    reference = _reference(tmp_path, X, models["txt"].predict(X))
    query = s3.split("?", 1)[1]
    endpoint = "http://" + dict(p.split("=") for p in query.split("&"))["endpoint_override"]
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket="artifacts", Key="models/own.txt",
                                                         Body=path.read_bytes())
    registry = ModelRegistry(tmp_path / "registry")
    registry.register("own", schema("regression"), reference, f"s3://artifacts/models/own.txt?{query}")
    assert registry.model_file("own") == ("own.txt", path.read_bytes())
    with pytest.raises(SpecError, match="does not exist"):
        registry.register("own", schema("regression"), reference, f"s3://artifacts/models/nothing.txt?{query}")


def test_a_model_file_that_does_not_serve_the_schema_is_refused_at_registration_naming_both_sides(tmp_path):
    """Caught when registered, not three retries into training: renamed features, a
    classifier for a regression, a binary model for three classes, classes it does not have."""
    import pandas as pd

    X, y = data(800)
    registry = ModelRegistry(tmp_path / "registry")
    named = lightgbm.LGBMRegressor(n_estimators=5, verbose=-1).fit(pd.DataFrame(X, columns=NAMES), y)
    path = tmp_path / "named.txt"
    named.booster_.save_model(str(path))
    renamed = {**schema("regression"), "features": [{"name": f"z{i}", "type": "numeric"} for i in range(6)]}
    reference = tmp_path / "renamed.parquet"
    pq.write_table(pa.table({**{f"z{i}": X[:, i] for i in range(6)}, "prediction": named.predict(X)}), reference)
    with pytest.raises(SpecError, match=r"features are \['x0'.*the schema's \['z0'"):
        registry.register("own", renamed, reference, path)

    binary = xgboost.XGBClassifier(n_estimators=5).fit(X, y > 0)
    path = tmp_path / "binary.json"
    binary.save_model(str(path))
    reference = _reference(tmp_path, X, binary.predict_proba(X)[:, 1])
    with pytest.raises(SpecError, match="binary classifier.*the schema's task is regression"):
        registry.register("own", schema("regression"), reference, path)
    labels = _reference(tmp_path, X, binary.predict(X).astype(str))
    with pytest.raises(SpecError, match="the schema's task is multiclass_classification"):
        registry.register("own", schema("multiclass_classification", "categorical"), labels, path)

    three = xgboost.XGBClassifier(n_estimators=5).fit(X, np.digitize(y, [-1.0, 1.0]))
    path = tmp_path / "three.json"
    three.save_model(str(path))
    wrong = _reference(tmp_path, X, np.where(three.predict(X) == 2, "high", three.predict(X).astype(str)))
    with pytest.raises(SpecError, match=r"classes \['high'\] the model file does not have; its classes are "
                                        r"\['0', '1', '2'\]"):
        registry.register("own", schema("multiclass_classification", "categorical"), wrong, path)
