"""Explainability: exact per-row attributions of the model's output to its features.

For any model, a *surrogate* is fitted: a gradient-boosted tree ensemble
(scikit-learn's HistGradientBoosting: it learns where a missing value goes,
as the user's model did) trained on the reference data to reproduce the model's own
predictions. Its attributions are exact path-dependent TreeSHAP values
(models/treeshap.py), so what is approximate is only how well the surrogate
follows the model, and that is measured (fidelity on held-out reference
rows), stored in the artifact, and enforced before publishing (`min_fidelity`).

What is explained, per row (`explanation_output`, which the attributions plus
`explanation_base_value` add up to):
- a numeric prediction (regression, or a classifier's score): the surrogate's
  prediction of it, in the same units (a score's attributions add up to the
  score);
- a categorical prediction (multiclass, or binary with class labels): the
  surrogate's margin (log-odds, its raw output) for the class the model
  predicted on that row (the surrogate's own prediction if the model's class is
  one the reference never showed), so attributions say what pushed the model
  towards the class it chose.

Categorical features enter the trees as their rank by frequency in the
reference (`FeatureEncoder(categorical="code")`): one column, one attribution
per feature. A missing numeric value (a reference gap, a null in a nullable
feature) enters as NaN, and goes down each split the way the trees learnt
(or, for a user's model file, the way its library routes it).

A sample rate explains a fraction of rows, chosen by a hash of the inference
id (the same rows on a replay); the rest get NULL.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .artifact import Manifest
from .encoding import EncoderPool, FeatureEncoder
from .enrichment import InferenceBatch, ModelFile, Output, Unusable, per_feature
from .hashing import id_hashes
from .spec import ModelSpec

# models/treeshap.py (numba) is imported where an artifact is fitted or loaded, so that a
# worker none of whose models uses explanations never loads the compiler.
if TYPE_CHECKING:
    from .treeshap import TreeEnsemble

NAME = "explainability"
PREFIX = "explanation_"
BASE, OUTPUT = f"{PREFIX}base_value", f"{PREFIX}output"
DEFAULTS = {"n_estimators": 100, "max_depth": 4, "learning_rate": 0.1, "min_fidelity": 0.8,
            "sample_rate": 1.0, "holdout": 0.2, "random_state": 0,
            # with a model file only: a value it reads as missing besides NaN (XGBoost's `missing`,
            # which the file does not carry), and which early-stopped rounds to use ("best" or "all")
            "missing_value": None, "iterations": "best"}
# How far our margins may be from the library's own on the reference rows (relative to
# the margins' size): XGBoost adds its trees in float32, LightGBM and scikit-learn in float64.
LIBRARY_TOLERANCE = {"xgboost": 1e-5, "lightgbm": 1e-9, "scikit-learn": 1e-9}
MAX_DEPTH = 10


class ExplainabilityArtifact:
    def __init__(self, encoder: FeatureEncoder, ensemble: TreeEnsemble, classes: list[str] | None,
                 parameters: dict, quality: dict, score_output: int = 0):
        self.score_output = score_output  # a numeric prediction: which output it is (a forest's P(class 1))
        self.encoder = encoder
        self.ensemble = ensemble
        self.classes = classes  # None: a numeric prediction (regression surrogate)
        self.parameters = parameters
        self.quality = quality
        self._class_codes = pa.array(classes, pa.string()) if classes else None
        self.surrogate = None  # the scikit-learn model, right after fit only (never stored)

    def transform(self, batch: InferenceBatch) -> dict[str, pa.Array]:
        """The rows the sample rate chooses explained, NULL elsewhere."""
        return self._columns(batch, self.parameters["sample_rate"])

    def explain(self, batch: InferenceBatch) -> dict[str, pa.Array]:
        """Every row explained, whatever the sample rate (on demand, what-if)."""
        return self._columns(batch, 1.0)

    def _columns(self, batch: InferenceBatch, rate: float) -> dict[str, pa.Array]:
        n = batch.num_rows
        chosen = np.arange(n) if rate >= 1.0 else np.flatnonzero(sampled(batch.inference_id, rate))
        if n == 0 or chosen.size == 0:
            return _nulls(self.encoder.names, n)
        X = self.encoder.transform(batch.columns, n)
        if chosen.size < n:
            X = X[chosen]
        ens = self.ensemble
        found = _attributions(X, batch.prediction, chosen, self._class_codes, ens.n_outputs, self.score_output,
                              ens.predict_raw, ens.explain)
        return _as_columns(self.encoder.names, n, chosen, *found)

    def to_blobs(self) -> dict[str, bytes]:
        doc = {"encoder": self.encoder.to_json(), "classes": self.classes, "score_output": self.score_output}
        return {"surrogate.json": json.dumps(doc).encode(), "ensemble.npz": self.ensemble.to_bytes()}


class ExplainabilityPool:
    """Explainability artifacts of one layout, classes and ensemble shape applied together:
    one encoding and one TreeSHAP call (models/treepool.py) for the rows of all of them,
    each row under its own model's trees and sample rate. Columns equal each artifact's
    own `transform`."""

    def __init__(self, artifacts: list[ExplainabilityArtifact]):
        from .treepool import EnsemblePool  # lazy: numba

        first = artifacts[0]
        self.encoders = EncoderPool([a.encoder for a in artifacts])
        self.ensembles = EnsemblePool([a.ensemble for a in artifacts])
        self.names = first.encoder.names
        self.score_output, self._class_codes = first.score_output, first._class_codes
        rates = np.array([min(a.parameters["sample_rate"], 1.0) for a in artifacts])
        self._every_row = rates >= 1.0
        self._below = np.array([_hash_bound(r) for r in rates], np.uint64)

    def __len__(self) -> int:
        return len(self.ensembles)

    @property
    def features(self) -> list[str]:
        return self.encoders.names

    def transform(self, batch: InferenceBatch, member: np.ndarray) -> dict[str, pa.Array]:
        """The rows each model's sample rate chooses explained, NULL elsewhere (`member[i]`: row
        i's artifact's position in this pool)."""
        n = batch.num_rows
        member = np.asarray(member, np.intp)
        if self._every_row.all():
            chosen = np.arange(n)
        else:
            chosen = np.flatnonzero(self._every_row[member] | (id_hashes(batch.inference_id) < self._below[member]))
        if n == 0 or chosen.size == 0:
            return _nulls(self.names, n)
        X = self.encoders.transform(batch.columns, n, member)
        if chosen.size < n:
            X, member = X[chosen], member[chosen]
        pool = self.ensembles
        found = _attributions(X, batch.prediction, chosen, self._class_codes, pool.n_outputs, self.score_output,
                              lambda X: pool.predict_raw(X, member),
                              lambda X, output: pool.explain(X, member, output))
        return _as_columns(self.names, n, chosen, *found)


def _attributions(X: np.ndarray, prediction: pa.Array, rows: np.ndarray, class_codes: pa.Array | None,
                  n_outputs: int, score_output: int, predict_raw, explain):
    """(attributions, base values, outputs) of the chosen `rows` (their encoded `X`): of a
    numeric prediction, its output; of a class, the margin of the class the model predicted
    on the row (the trees' own choice where the row's class is not one they know)."""
    if class_codes is None:
        return explain(X, score_output)
    margins = predict_raw(X)
    single = n_outputs == 1  # two classes, one output: the margin of classes[1]
    if single:
        own = (margins[:, 0] > 0).astype(np.int64)
    else:
        own = margins.argmax(axis=1)
    told = pc.index_in(prediction.take(pa.array(rows)), value_set=class_codes)
    told = told.to_numpy(zero_copy_only=False) if told.null_count == 0 else \
        pc.fill_null(told, -1).to_numpy(zero_copy_only=False)
    cls = np.where(told >= 0, told, own).astype(np.int64)
    if single:
        phi, base, output = explain(X, 0)
        sign = np.where(cls == 1, 1.0, -1.0)  # the margin of classes[0] is minus that of classes[1]
        return phi * sign[:, None], base * sign, output * sign
    return explain(X, cls)


def _nulls(features: list[str], n: int) -> dict[str, pa.Array]:
    return {name: pa.nulls(n, pa.float64()) for name in [*(f"{PREFIX}{f}" for f in features), BASE, OUTPUT]}


def _as_columns(features: list[str], n: int, chosen: np.ndarray, phi: np.ndarray, base: np.ndarray,
                output: np.ndarray) -> dict[str, pa.Array]:
    """The output columns of `n` rows from what the `chosen` ones got (NULL elsewhere)."""
    names = [f"{PREFIX}{f}" for f in features]
    if chosen.size == n:
        columns = np.ascontiguousarray(phi.T)
        out = {name: pa.array(columns[j]) for j, name in enumerate(names)}
        out[BASE], out[OUTPUT] = pa.array(base), pa.array(output)
        return out
    missing = np.ones(n, bool)
    missing[chosen] = False

    def spread(values: np.ndarray) -> pa.Array:
        full = np.zeros(n)
        full[chosen] = values
        return pa.array(full, mask=missing)

    out = {name: spread(phi[:, j]) for j, name in enumerate(names)}
    out[BASE], out[OUTPUT] = spread(base), spread(output)
    return out


class Explainability:
    name = NAME
    reserved = (f"{PREFIX}*",)

    def outputs(self, spec: ModelSpec) -> list[Output]:
        return per_feature(PREFIX, spec, doc="the feature's attribution (SHAP value) to explanation_output") + [
            Output(BASE, pa.float64(), BASE, doc="the surrogate's expected output on the reference data"),
            Output(OUTPUT, pa.float64(), OUTPUT,
                   doc="the explained output for the row: base value plus the attributions"),
        ]

    def check_model(self, spec: ModelSpec, reference: pa.Schema | None = None) -> None:
        """Any task; a feature may not be called `base_value` or `output` (its
        attribution column would be the base value's or the output's)."""
        for c in spec.features:
            if f"{PREFIX}{c.name}" in (BASE, OUTPUT):
                raise Unusable(f"feature {c.name!r}: its attribution column {PREFIX}{c.name} would be the "
                               "explanation's own column of that name; rename the feature")

    def check_config(self, config: dict) -> dict:
        return _parameters(config)

    def check_quality(self, quality: dict, config: dict) -> None:
        """Refuse a surrogate that does not follow the model closely enough."""
        params = _parameters(config)
        if quality.get("fidelity", -np.inf) < params["min_fidelity"]:
            raise ValueError(
                f"{NAME}: the surrogate follows the model with {quality.get('metric')} "
                f"{quality.get('fidelity'):.3f} on {quality.get('holdout_rows')} held-out reference rows, below "
                f"min_fidelity {params['min_fidelity']}: trees of depth {params['max_depth']} x "
                f"{params['n_estimators']} cannot reproduce its predictions from these features (raise max_depth "
                "or n_estimators, or lower min_fidelity to accept it)")

    def fit(self, spec: ModelSpec, reference: pa.Table, config: dict,
            model_file: ModelFile | None = None) -> ExplainabilityArtifact:
        params = _parameters(config)
        if model_file is not None:
            return self._fit_model_file(spec, reference, params, model_file)
        encoder = FeatureEncoder.fit(spec, reference, categorical="code", nulls="nan")
        X = encoder.transform({n: reference.column(n) for n in spec.feature_names}, reference.num_rows)
        target = reference.column("prediction").combine_chunks()
        known = ~target.is_null().to_numpy(zero_copy_only=False)
        X = X[known]
        rng = np.random.default_rng(params["random_state"])
        holdout = rng.random(len(X)) < params["holdout"]
        if holdout.sum() < 10 or (~holdout).sum() < 10:
            raise ValueError(f"{NAME}: {len(X)} reference rows with a prediction; at least 10 to fit on and "
                             "10 to measure fidelity on are needed (more reference rows, or another holdout)")
        # here, not at the top: training only, ~2 s of imports a worker and the CLI never need
        from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

        # no early stopping: the rounds asked for, the same trees on every run
        common = dict(max_iter=params["n_estimators"], max_depth=params["max_depth"],
                      max_leaf_nodes=2 ** params["max_depth"], learning_rate=params["learning_rate"],
                      random_state=params["random_state"], early_stopping=False)
        if spec.prediction_type == "numeric":
            y = target.to_numpy(zero_copy_only=False)[known]
            model = HistGradientBoostingRegressor(**common).fit(X[~holdout], y[~holdout])
            fitted_y = model.predict(X[holdout])
            residual = np.sum((y[holdout] - fitted_y) ** 2)
            spread = np.sum((y[holdout] - y[holdout].mean()) ** 2)
            fidelity = 1.0 - residual / spread if spread > 0 else float(residual == 0)
            quality = {"metric": "r2", "fidelity": round(float(fidelity), 6)}
            classes = None
        else:
            y = np.asarray(target.to_pylist(), dtype=object)[known]
            classes = sorted(set(y[~holdout]))
            if len(classes) < 2:
                raise ValueError(f"{NAME}: the reference predictions hold one class ({classes}): nothing to explain")
            model = HistGradientBoostingClassifier(**common).fit(X[~holdout], y[~holdout])
            classes = [str(c) for c in model.classes_]
            accuracy = float(np.mean(model.predict(X[holdout]) == y[holdout]))
            quality = {"metric": "accuracy", "fidelity": round(accuracy, 6)}
        quality["holdout_rows"] = int(holdout.sum())
        quality["explains"] = "surrogate"
        quality["unit"] = attribution_unit(spec, quality)
        from .sklearntrees import ensemble as sklearn_ensemble  # lazy: numba

        ensemble = sklearn_ensemble(model, n_features=len(spec.features))
        quality["artifact_bytes"] = ensemble.nbytes
        artifact = ExplainabilityArtifact(encoder, ensemble, classes, params, quality)
        artifact.surrogate = model
        return artifact

    def _fit_model_file(self, spec: ModelSpec, reference: pa.Table, params: dict,
                        model_file: ModelFile) -> ExplainabilityArtifact:
        """The user's own tree model, explained exactly; fidelity is then how well the file
        reproduces the reference predictions: whether it is the model that made them."""
        from . import usermodels  # lazy: numba

        model = usermodels.load(model_file.name, model_file.data, len(spec.features), params["missing_value"],
                                params["iterations"])
        categories = usermodels.check_schema(model, spec)  # checked at registration; the schema may have changed
        encoder = FeatureEncoder.fit(spec, reference, categorical="model", nulls="nan", model_categories=categories)
        X = encoder.transform({n: reference.column(n) for n in spec.feature_names}, reference.num_rows)
        target = reference.column("prediction").combine_chunks()
        known = ~target.is_null().to_numpy(zero_copy_only=False)
        margins = model.ensemble.predict_raw(X)
        library = self._check_reading(model, model_file, X, margins)
        predicted = usermodels.to_prediction(margins[known], model.link)
        outputs = model.ensemble.n_outputs
        # a binary forest's two class probabilities, with a score sent as the prediction: P(class 1)
        score_output = 1 if outputs == 2 and model.link == "identity" and spec.prediction_type == "numeric" else 0
        if outputs == 1 or score_output:  # check_schema: the predictions are numbers here
            y = target.to_numpy(zero_copy_only=False)[known]
            spread = np.sum((y - y.mean()) ** 2)
            residual = np.sum((y - predicted[:, score_output]) ** 2)
            fidelity = 1.0 - residual / spread if spread > 0 else float(residual == 0)
            quality = {"metric": "r2", "fidelity": round(float(fidelity), 6)}
            classes = None
        else:  # check_schema: class labels here
            classes = model.classes or [str(k) for k in range(outputs)]  # a booster's classes are 0..K-1
            told = np.asarray(target.to_pylist(), dtype=object)[known]
            fidelity = float(np.mean(np.asarray(classes, dtype=object)[predicted.argmax(axis=1)] == told))
            quality = {"metric": "accuracy", "fidelity": round(fidelity, 6)}
        quality.update({"holdout_rows": int(known.sum()), "explains": "model_file", "model_file": model_file.name,
                        "format": model.format, "objective": model.objective, "artifact_bytes": model.ensemble.nbytes,
                        "trees": model.ensemble.n_trees, "trees_by_recursion": model.ensemble.n_path_trees})
        quality["unit"] = attribution_unit(spec, quality, model.link, score_output)
        if library is not None:
            quality["checked_against"] = library
        if model.note:
            quality["note"] = model.note
        return ExplainabilityArtifact(encoder, model.ensemble, classes, params, quality, score_output)

    @staticmethod
    def _check_reading(model, model_file: ModelFile, X: np.ndarray, margins: np.ndarray) -> dict | None:
        """Our reading of the file against its library's own outputs on the reference rows,
        where the library is installed: a file we read differently is refused, not explained."""
        from . import usermodels  # lazy: numba

        theirs = usermodels.library_margins(model, model_file.data, X)
        if theirs is None:
            return None
        library, raw = theirs
        if raw.shape != margins.shape:
            raise ValueError(f"{NAME}: {library} gives {raw.shape[1]} outputs per row for the model file, our reading "
                             f"{margins.shape[1]}; refused rather than explained wrong")
        gap = np.abs(raw - margins)
        scale = 1.0 + np.abs(raw)
        tolerance = LIBRARY_TOLERANCE[library.split()[0]]
        off = gap > tolerance * scale
        if off.any():
            rows = np.flatnonzero(off.any(axis=1))
            raise ValueError(f"{NAME}: our reading of {model_file.name!r} differs from {library}'s own outputs on "
                             f"{len(rows)} of {len(X)} reference rows (by up to {gap.max():.3g}, first at row "
                             f"{rows[0]}); refused rather than explained wrong: please report it with the file")
        return {"library": library, "rows": len(X), "max_difference": float(gap.max()) if gap.size else 0.0}

    def pool(self, artifacts: list[ExplainabilityArtifact]) -> list[tuple[ExplainabilityPool, list[int]]]:
        """Serving many models: artifacts of the same features and kinds, classes and ensemble
        shape (outputs, how rows are read) explain together, one pool per group; an artifact
        with trees too deep for tables (a deep user model) stays on its own."""
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(artifacts):
            key = _pool_key(a)
            if key is not None:
                groups.setdefault(key, []).append(i)
        return [(ExplainabilityPool([artifacts[i] for i in idx]), idx) for idx in groups.values()]

    def load(self, spec: ModelSpec, manifest: Manifest, blobs: dict[str, bytes]) -> ExplainabilityArtifact:
        doc = json.loads(blobs["surrogate.json"])
        encoder = FeatureEncoder.for_spec(doc["encoder"], spec)
        from .treeshap import TreeEnsemble  # lazy: numba

        ensemble = TreeEnsemble.from_bytes(blobs["ensemble.npz"])
        if ensemble.n_features != len(encoder.names):
            raise ValueError(f"surrogate has {ensemble.n_features} features, the encoder {len(encoder.names)}")
        classes = doc.get("classes")
        score_output = int(doc.get("score_output", 0))
        if ensemble.n_outputs not in (((1,) if score_output == 0 else (2,)) if classes is None
                                      else (1, len(classes)) if len(classes) == 2 else (len(classes),)):
            raise ValueError(f"surrogate has {ensemble.n_outputs} outputs for classes {classes}")
        if ensemble.n_path_trees:  # compile the recursion here (the worker loads off the stream's
            ensemble.explain(np.zeros((1, ensemble.n_features)))  # path), not in the first batch
        parameters = {k: v for k, v in manifest.parameters.items() if k != "quality"}
        return ExplainabilityArtifact(encoder, ensemble, classes, _parameters(parameters),
                                      manifest.parameters.get("quality", {}), score_output)


def _pool_key(artifact: ExplainabilityArtifact) -> tuple | None:
    """Artifacts with equal keys explain together; None: one that explains on its own (trees
    left to the recursion: too deep for tables)."""
    from .treepool import can_pool, pool_key  # lazy: numba

    if not can_pool(artifact.ensemble):
        return None
    return (tuple(artifact.encoder.names), tuple(artifact.encoder.kinds),
            tuple(artifact.classes) if artifact.classes is not None else None, artifact.score_output,
            pool_key(artifact.ensemble))


def sampled(inference_id: pa.Array, rate: float) -> np.ndarray:
    """Which rows a sample rate explains: a 64-bit hash of each inference id (FNV-1a,
    then MurmurHash3's finaliser) below rate * 2^64, so the same ids are chosen on every replay, in any batch."""
    return id_hashes(inference_id) < _hash_bound(rate)


def _hash_bound(rate: float) -> np.uint64:
    return np.uint64(min(rate, 1.0) * 18446744073709549568.0)  # the largest float64 below 2^64


def attribution_unit(spec: ModelSpec, quality: dict, link: str | None = None, score_output: int = 0) -> str:
    """What an attribution is measured in (what `explanation_output` is), in words for a
    chart's axis: `quality["unit"]` of artifacts trained since it was recorded; for older
    ones, from the spec and what the artifact explains."""
    if quality.get("unit"):
        return quality["unit"]
    explains_class = "the log-odds (margin) of the class the model predicted on the row"
    if quality.get("explains") != "model_file" or link is None:
        if spec.prediction_type != "numeric":
            return explains_class
        return "the score's own units (probability)" if spec.task == "binary_classification" \
            else "the prediction's own units"
    if link == "identity":
        return "probability of class 1" if score_output else "the prediction's own units"
    if link == "logistic":
        return "the model's margin: log-odds of class 1" if spec.prediction_type == "numeric" else explains_class
    if link == "exp":
        return "the model's margin: log of the prediction"
    return explains_class


def _parameters(config: dict) -> dict:
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"{NAME}: unknown setting(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    params = {**DEFAULTS, **config}
    missing = params["missing_value"]
    if missing is not None and (isinstance(missing, bool) or not isinstance(missing, (int, float))
                                or not np.isfinite(missing)):
        raise ValueError(f"{NAME}.missing_value: a finite number (the value the model reads as missing, as "
                         f"XGBoost's missing=...) or null, got {missing!r}")
    if params["iterations"] not in ("best", "all"):
        raise ValueError(f"{NAME}.iterations: 'best' (an early-stopped XGBoost model's best_iteration, as its "
                         f"estimator's predict) or 'all' (every round, as Booster.predict), got "
                         f"{params['iterations']!r}")
    for key in ("n_estimators", "max_depth", "random_state"):
        value = params[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "random_state" else 1):
            raise ValueError(f"{NAME}.{key}: must be a {'non-negative' if key == 'random_state' else 'positive'} "
                             f"integer, got {value!r}")
    if params["max_depth"] > MAX_DEPTH:
        raise ValueError(f"{NAME}.max_depth: at most {MAX_DEPTH} (exact TreeSHAP tables grow as 2^depth), "
                         f"got {params['max_depth']}")
    for key, low, high in (("learning_rate", 0.0, 1.0), ("min_fidelity", -1.0, 1.0), ("sample_rate", 0.0, 1.0),
                           ("holdout", 0.0, 0.9)):
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high or \
                (key in ("learning_rate", "holdout") and value <= low):
            raise ValueError(f"{NAME}.{key}: must be a number in {'(' if key in ('learning_rate', 'holdout') else '['}"
                             f"{low}, {high}], got {value!r}")
        params[key] = float(value)
    return params
