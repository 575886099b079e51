"""Bias mitigation: per-group decision thresholds on a binary classifier's score.

Fitted with fairlearn's `ThresholdOptimizer` (`prefit=True`, on the scores the
model sent with its reference rows), after Hardt, Price and Srebro (2016): for
each group of a sensitive attribute, a rule on the score that makes the groups'
rates meet a constraint while keeping accuracy as high as it can:
- `demographic_parity`: equal selection rates;
- `equal_opportunity` (default): equal true positive rates (fairlearn's
  `true_positive_rate_parity`);
- `equalized_odds`: equal true and false positive rates.

The trade-off curve. For each constraint and each sensitive attribute the
artifact keeps `points` (default 101) rules, from the exact constraint to the
most accurate rule with no constraint, each with its accuracy and its gap on
the reference rows (the largest difference of the constraint's rates between
groups; for equalized odds the larger of the two). Demographic parity and equal
opportunity use fairlearn's relaxed form (`tol`: the most accurate rule whose
gap is at most tol) on an even grid of tol; fairlearn has no relaxed form of
equalized odds, so its curve mixes fairlearn's exact rule with the most
accurate unconstrained one (each point a valid rule, not always the most
accurate one at its gap). The chosen point is the most accurate with a gap of
at most `max_gap` (default 0.02), or the one named by `point` (its index).

A rule gives each row a probability of a positive decision: a weighted sum of
threshold tests on the score (`score > t`, `score < t`) and constants, exactly
fairlearn's `InterpolatedThresholder`. Two ways to decide:
- `randomised` (default): positive when u < P(positive), fairlearn's rule
  exactly, with u drawn not at random but from a 64-bit hash of the inference
  id: a replay or a redelivered row gets the same decision, and over many rows
  the groups meet the constraint as fairlearn's do;
- `deterministic`: one threshold per group (`score >= t`), the one that gives
  the group the same selection rate on the reference rows as its rule; the
  gap it reaches there is kept beside the randomised one.

A row whose attribute value was not a group in training, or that has no value,
gets NULL (never a guessed threshold); the engine counts NULLs.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .artifact import Manifest
from .enrichment import InferenceBatch, Output, Unusable
from .hashing import id_hashes
from .spec import ModelSpec

NAME = "bias_mitigation"
OUTPUT = "bias_mitigated_prediction"
CONSTRAINTS = {"demographic_parity": "demographic_parity", "equal_opportunity": "true_positive_rate_parity",
               "equalized_odds": "equalized_odds"}
MODES = ("randomised", "deterministic")
DEFAULTS = {"constraint": "equal_opportunity", "mode": "randomised", "attribute": None, "max_gap": 0.02,
            "point": None, "points": 101}
GRID_SIZE = 1000  # fairlearn's grid over each group's rates
MIN_GROUP_ROWS = 10  # a group with fewer labelled reference rows of either class is not fitted


def sensitive(spec: ModelSpec) -> list[str]:
    return [c.name for c in spec.columns if c.sensitive]


# -- rules: a group's probability of a positive decision given the score ----------------
def rule_from_fairlearn(bunch) -> list[list]:
    """fairlearn's interpolation for one group as [[weight, op, threshold], ...], op '>' or
    '<' on the score, or 'const' with threshold the constant probability. An infinite
    threshold is a constant (JSON holds no infinity)."""
    ignore = float(bunch.get("p_ignore", 0.0))
    out = []
    for p, op in ((bunch.p0, bunch.operation0), (bunch.p1, bunch.operation1)):
        w = (1.0 - ignore) * float(p)
        t = float(op.threshold)
        if w <= 0:
            continue
        if math.isinf(t):
            always = (op.operator == ">" and t < 0) or (op.operator == "<" and t > 0)
            out.append([w, "const", 1.0 if always else 0.0])
        else:
            out.append([w, op.operator, t])
    if ignore > 0:
        out.append([ignore, "const", float(bunch.prediction_constant)])
    return out


def positive_probability(rule: list[list], scores: np.ndarray) -> np.ndarray:
    p = np.zeros(len(scores))
    for w, op, t in rule:
        p += w * (t if op == "const" else (scores > t) if op == ">" else (scores < t))
    return p


def _rates(p: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Selection rate, true positive rate and false positive rate of decisions with
    probabilities p (expected values)."""
    pos, neg = y == 1, y == 0
    return (float(p.mean()) if len(p) else math.nan, float(p[pos].mean()) if pos.any() else math.nan,
            float(p[neg].mean()) if neg.any() else math.nan)


def gap(constraint: str, rates: dict[str, tuple[float, float, float]]) -> float:
    """The largest difference between groups of the constraint's rates."""
    def spread(k):
        values = [r[k] for r in rates.values() if not math.isnan(r[k])]
        return max(values) - min(values) if values else 0.0
    if constraint == "demographic_parity":
        return spread(0)
    if constraint == "equal_opportunity":
        return spread(1)
    return max(spread(1), spread(2))


def evaluate(constraint: str, probability: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> tuple[float, float]:
    """(accuracy, gap) of decisions with these probabilities per group (expected values)."""
    correct = sum(float((p * yy + (1 - p) * (1 - yy)).sum()) for p, yy in zip(probability.values(), y.values()))
    n = sum(len(yy) for yy in y.values())
    return correct / n, gap(constraint, {g: _rates(probability[g], y[g]) for g in probability})


def deterministic_thresholds(rules: dict, scores: dict[str, np.ndarray]) -> dict[str, float | None]:
    """One threshold per group (positive when score >= t; None: nobody) giving the group
    its rule's selection rate on the reference rows."""
    out = {}
    for g, rule in rules.items():
        s = np.sort(scores[g])[::-1]
        k = int(round(positive_probability(rule, s).mean() * len(s)))
        out[g] = float(s[k - 1]) if k > 0 else None
    return out


def deterministic_probability(threshold: float | None, scores: np.ndarray) -> np.ndarray:
    return np.zeros(len(scores)) if threshold is None else (scores >= threshold).astype(float)


# -- the artifact ---------------------------------------------------------------------
class BiasArtifact:
    def __init__(self, doc: dict, parameters: dict):
        self.doc = doc  # attribute, curves, chosen: see BiasMitigation.fit
        self.parameters = parameters
        self.quality = doc["quality"]
        point = doc["curves"][doc["constraint"]][doc["attribute"]][doc["chosen"]]
        self.attribute = doc["attribute"]
        self.mode = doc["mode"]
        self.rules = point["rules"]
        self.thresholds = point["deterministic"]["thresholds"]

    def transform(self, batch: InferenceBatch) -> dict[str, pa.Array]:
        n = batch.num_rows
        groups = batch.columns.get(self.attribute)
        scores = batch.prediction
        if groups is None or n == 0:
            return {OUTPUT: pa.nulls(n, pa.uint32())}
        groups = groups.cast(pa.string())
        known = pc.and_(pc.is_in(groups, value_set=pa.array(list(self.rules), pa.string())), pc.is_valid(scores))
        known = known.fill_null(False).to_numpy(zero_copy_only=False)
        s = scores.fill_null(0.0).to_numpy(zero_copy_only=False).astype(float)
        g = groups.fill_null("").to_numpy(zero_copy_only=False)
        p = np.zeros(n)
        for name in self.rules:  # one vectorised pass per group
            rows = known & (g == name)
            if rows.any():
                p[rows] = (positive_probability(self.rules[name], s[rows]) if self.mode == "randomised"
                           else deterministic_probability(self.thresholds[name], s[rows]))
        if self.mode == "randomised":
            u = id_hashes(batch.inference_id).astype(np.float64) / 18446744073709551616.0
            decision = u < p
        else:
            decision = p >= 0.5
        return {OUTPUT: pa.array(decision.astype(np.uint32), pa.uint32(), mask=~known)}

    def to_blobs(self) -> dict[str, bytes]:
        return {"bias.json": json.dumps(self.doc).encode()}

    def choose(self, constraint: str, index: int) -> "BiasArtifact":
        """The same curves with another chosen point (published as a new version, no retraining)."""
        if constraint not in self.doc["curves"]:
            raise ValueError(f"constraint {constraint!r}: one of {', '.join(self.doc['curves'])}")
        curve = self.doc["curves"][constraint][self.attribute]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(curve):
            raise ValueError(f"index {index!r}: a point of the curve, 0 to {len(curve) - 1}")
        doc = {**self.doc, "constraint": constraint, "chosen": index}
        doc["quality"] = _quality(doc)
        return BiasArtifact(doc, {**self.parameters, "constraint": constraint, "point": index})


def _quality(doc: dict) -> dict:
    point = doc["curves"][doc["constraint"]][doc["attribute"]][doc["chosen"]]
    mode = point["deterministic"] if doc["mode"] == "deterministic" else point
    raw = doc["raw"][doc["constraint"]][doc["attribute"]]
    return {"constraint": doc["constraint"], "attribute": doc["attribute"], "mode": doc["mode"],
            "point": doc["chosen"], "accuracy": mode["accuracy"], "gap": mode["gap"],
            "raw_accuracy": raw["accuracy"], "raw_gap": raw["gap"], "groups": sorted(point["rules"])}


class BiasMitigation:
    name = NAME
    reserved = (OUTPUT,)

    def outputs(self, spec: ModelSpec) -> list[Output]:
        return [Output(OUTPUT, pa.uint32(), OUTPUT, bounds=(0.0, 1.0),
                       doc="the decision after per-group thresholds (0/1); NULL for a group not seen in training")]

    def check_model(self, spec: ModelSpec, reference: pa.Schema | None = None) -> None:
        if spec.task != "binary_classification" or spec.prediction_type != "numeric":
            raise Unusable("bias mitigation needs a binary classifier that sends its score (task "
                           "binary_classification, prediction_type numeric)")
        if not sensitive(spec):
            raise Unusable("bias mitigation needs a sensitive attribute: mark a column of the schema "
                           '"sensitive": true')
        if reference is not None and "label" not in reference.names:
            raise Unusable("bias mitigation learns from labels: the reference data has no label column")

    def check_config(self, config: dict) -> dict:
        return _parameters(config)

    def check_quality(self, quality: dict, config: dict) -> None:
        """The chosen point is reported (accuracy, gap, and the raw decision's); no bar."""

    def fit(self, spec: ModelSpec, reference: pa.Table, config: dict, model_file=None) -> BiasArtifact:
        params = _parameters(config)
        attributes = sensitive(spec)
        attribute = params["attribute"] or attributes[0]
        if attribute not in attributes:
            raise ValueError(f"bias_mitigation.attribute: {attribute!r} is not a sensitive attribute of the "
                             f"model; it has {', '.join(attributes)}")
        curves, raw = {}, {}
        for constraint in CONSTRAINTS:
            curves[constraint], raw[constraint] = {}, {}
            for name in attributes:
                curves[constraint][name], raw[constraint][name] = _curve(spec, reference, name, constraint,
                                                                          params["points"])
        doc = {"attribute": attribute, "mode": params["mode"], "constraint": params["constraint"],
               "curves": curves, "raw": raw}
        doc["chosen"] = params["point"] if params["point"] is not None else _most_accurate_within(
            curves[params["constraint"]][attribute], params["max_gap"], params["mode"])
        if not 0 <= doc["chosen"] < len(curves[params["constraint"]][attribute]):
            raise ValueError(f"bias_mitigation.point: {doc['chosen']} is not a point of the curve "
                             f"(0 to {params['points'] - 1})")
        doc["quality"] = _quality(doc)
        return BiasArtifact(doc, params)

    def load(self, spec: ModelSpec, manifest: Manifest, blobs: dict[str, bytes]) -> BiasArtifact:
        doc = json.loads(blobs["bias.json"])
        parameters = {k: v for k, v in manifest.parameters.items() if k != "quality"}
        return BiasArtifact(doc, parameters)


def _most_accurate_within(curve: list[dict], max_gap: float, mode: str) -> int:
    """The most accurate point whose gap is at most max_gap; none: the fairest."""
    def figures(p):
        return p["deterministic"] if mode == "deterministic" else p
    within = [i for i, p in enumerate(curve) if figures(p)["gap"] <= max_gap + 1e-12]
    if not within:
        return min(range(len(curve)), key=lambda i: figures(curve[i])["gap"])
    return max(within, key=lambda i: (figures(curve[i])["accuracy"], -figures(curve[i])["gap"]))


def _training_rows(spec: ModelSpec, reference: pa.Table, attribute: str):
    if "label" not in reference.column_names:
        raise ValueError("bias_mitigation: the reference data has no label column")
    s = reference.column("prediction").to_numpy(zero_copy_only=False).astype(float)
    y = reference.column("label").to_numpy(zero_copy_only=False).astype(float)
    g = reference.column(attribute).cast(pa.string()).fill_null("\0").to_numpy(zero_copy_only=False)
    keep = np.isfinite(s) & np.isin(y, (0.0, 1.0)) & (g != "\0")
    s, y, g = s[keep], y[keep].astype(int), g[keep]
    fitted = [v for v in np.unique(g) if min((y[g == v] == 1).sum(), (y[g == v] == 0).sum()) >= MIN_GROUP_ROWS]
    if len(fitted) < 2:
        raise ValueError(f"bias_mitigation: the reference data needs two groups of {attribute!r} with at least "
                         f"{MIN_GROUP_ROWS} labelled rows of each class; it has {len(fitted)}")
    keep = np.isin(g, fitted)
    return s[keep], y[keep], g[keep]


def _curve(spec: ModelSpec, reference: pa.Table, attribute: str, constraint: str, points: int):
    """(the curve's points, the raw decision's accuracy and gap) for one attribute and constraint."""
    from fairlearn.postprocessing import ThresholdOptimizer  # here: training only (pandas, scipy)
    from fairlearn.postprocessing._relaxed_constraints import maximize_objective_with_tolerance

    s, y, g = _training_rows(spec, reference, attribute)
    groups = sorted(np.unique(g).tolist())
    scores = {v: s[g == v] for v in groups}
    labels = {v: y[g == v] for v in groups}
    estimator = _Scores().fit(s.reshape(-1, 1), y)

    def optimizer(method: str):
        fitted = ThresholdOptimizer(estimator=estimator, constraints=method, prefit=True, predict_method="predict",
                                    grid_size=GRID_SIZE).fit(s.reshape(-1, 1), y, sensitive_features=g)
        exact = {str(k): rule_from_fairlearn(b) for k, b in fitted.interpolated_thresholder_.interpolation_dict.items()}
        return fitted, exact

    def relaxed(fitted, tol: float) -> dict[str, list]:
        """fairlearn's rule at `tol` (ThresholdOptimizer(tol=tol).fit does exactly this, from the same
        per-group curves, which depend on the data only: one fit serves every tol; pinned against a
        fit per tol by tests/test_bias.py)."""
        if not tol:
            return None
        curves = fitted._tradeoff_curve
        weights = [float((g == k).mean()) for k in curves]
        indices, _ = maximize_objective_with_tolerance(dataframes=list(curves.values()), weights=weights, tol=tol)
        return {str(k): rule_from_fairlearn(curves[k].iloc[i]) for k, i in zip(curves, indices)}

    def point(rules: dict, tol: float | None) -> dict:
        probability = {v: positive_probability(rules[v], scores[v]) for v in groups}
        accuracy, gap_ = evaluate(constraint, probability, labels)
        thresholds = deterministic_thresholds(rules, scores)
        d_acc, d_gap = evaluate(constraint, {v: deterministic_probability(thresholds[v], scores[v]) for v in groups},
                                labels)
        return {"tol": tol, "accuracy": accuracy, "gap": gap_, "rules": rules,
                "deterministic": {"accuracy": d_acc, "gap": d_gap, "thresholds": thresholds}}

    opportunity, opportunity_exact = optimizer("true_positive_rate_parity")
    free = relaxed(opportunity, 1.0)  # the most accurate rules: no constraint binds at tol 1
    free_gap = evaluate(constraint, {v: positive_probability(free[v], scores[v]) for v in groups}, labels)[1]
    if constraint == "equalized_odds":
        _, exact = optimizer("equalized_odds")
        curve = []
        for lam in np.linspace(0.0, 1.0, points):  # from exact to free
            rules = {v: [[w * (1 - lam), op, t] for w, op, t in exact[v]] + [[w * lam, op, t] for w, op, t in free[v]]
                     for v in groups}
            curve.append(point({v: [c for c in r if c[0] > 0] for v, r in rules.items()}, None))
    else:
        fitted, exact = (opportunity, opportunity_exact) if constraint == "equal_opportunity" else \
            optimizer(CONSTRAINTS[constraint])
        curve = [point(relaxed(fitted, float(tol)) or exact, float(tol))
                 for tol in np.linspace(0.0, max(free_gap, 1e-9), points)]
    threshold = float(spec.positive_threshold)
    raw_accuracy, raw_gap = evaluate(constraint, {v: (scores[v] >= threshold).astype(float) for v in groups}, labels)
    return curve, {"accuracy": raw_accuracy, "gap": raw_gap}


class _Scores:
    """The model's own scores as fairlearn's prefit estimator (column 0 of X is the score)."""

    def fit(self, X, y):
        from sklearn.base import BaseEstimator, ClassifierMixin  # here: training only

        class Scores(ClassifierMixin, BaseEstimator):
            def fit(self, X, y):
                self.fitted_ = True
                return self

            def predict(self, X):
                return np.asarray(X)[:, 0]
        return Scores().fit(X, y)


def _parameters(config: dict) -> dict:
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"bias_mitigation: unknown setting(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    params = {**DEFAULTS, **config}
    if params["constraint"] not in CONSTRAINTS:
        raise ValueError(f"bias_mitigation.constraint: one of {', '.join(CONSTRAINTS)}, got {params['constraint']!r}")
    if params["mode"] not in MODES:
        raise ValueError(f"bias_mitigation.mode: one of {', '.join(MODES)}, got {params['mode']!r}")
    if params["attribute"] is not None and not isinstance(params["attribute"], str):
        raise ValueError("bias_mitigation.attribute: the name of a sensitive attribute")
    gap_ = params["max_gap"]
    if isinstance(gap_, bool) or not isinstance(gap_, (int, float)) or not 0 <= gap_ <= 1:
        raise ValueError(f"bias_mitigation.max_gap: a number in [0, 1], got {gap_!r}")
    for key, low in (("points", 100), ("point", 0)):
        value = params[key]
        if value is None and key == "point":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low or value > 10_000:
            raise ValueError(f"bias_mitigation.{key}: an integer from {low} to 10000, got {value!r}")
    return params
