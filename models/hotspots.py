"""Hotspots: regions of the input space where a classifier is often wrong.

A shallow decision tree (scikit-learn's, depth `max_depth`, at least
`min_rows` rows per leaf) learns to separate the rows the model got right
from those it got wrong (binary scores: `score >= positive_threshold` against
the label; class labels: prediction against label). From the root down, the
first node on each path whose accuracy is below `accuracy_threshold` (default
0.4) and that holds at least `min_rows` rows is a hotspot (a region the tree
cut into several leaves stays one hotspot), described by the conditions on its
path, merged per feature into at most `max_depth` (<= 7) readable rules:
`income < 30000 AND region IN ('north')`. Categorical features split on
their categories' frequency rank in the reference, so a split reads as a set
of categories; a category never seen in training falls with the rarest ones.

Hotspots follow the stream (`stream_training`): the rows are the reference
data's labelled rows plus, drawn by the training step, the stream's labelled
rows of the last `stream_window` (at most `stream_rows`), and the trigger
retrains every `retrain_every`. Stream rows weigh 1; the reference rows
together weigh at most `reference_share` (0.25) of the whole once the stream
has rows, so a region where the model is now wrong shows up, and one it has
stopped being wrong in goes away, even with a large reference set.

The worker tags each row with the hotspot its features fall in (`hotspot_id`,
NULL outside every hotspot): the leaves' conditions on the encoded features,
the very splits the tree made, evaluated with numpy (no scikit-learn at
serving time).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from enricher.windows import parse_window

from .artifact import Manifest
from .encoding import FeatureEncoder
from .enrichment import FROM_STREAM, InferenceBatch, Output, StreamTraining, Unusable
from .spec import ModelSpec

NAME = "hotspots"
OUTPUT = "hotspot_id"
DEFAULTS = {"max_depth": 4, "min_rows": 50, "accuracy_threshold": 0.4, "random_state": 0,
            # Following the stream: the labelled rows of this recent window, at most this many
            # (0: the reference data alone), retrained on this schedule (None: never by schedule).
            "stream_window": "7d", "stream_rows": 50_000, "retrain_every": "1d",
            # Once stream rows are there, the reference rows together weigh at most this share.
            "reference_share": 0.25}
MAX_RULES = 7


def correct(spec: ModelSpec, prediction: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Whether each prediction was right (rows with a label)."""
    if spec.prediction_type == "numeric":
        return (prediction.astype(float) >= spec.positive_threshold) == (label.astype(float) == 1)
    return prediction.astype(str) == label.astype(str)


class HotspotsArtifact:
    def __init__(self, encoder: FeatureEncoder, hotspots: list[dict], parameters: dict, quality: dict):
        self.encoder = encoder
        self.hotspots = hotspots  # id, rules (text), conditions [[column, "<=" or ">", threshold]], rows, accuracy
        self.parameters = parameters
        self.quality = quality

    def transform(self, batch: InferenceBatch) -> dict[str, pa.Array]:
        n = batch.num_rows
        ids = np.full(n, None, dtype=object)
        if self.hotspots and n:
            X = self.encoder.transform(batch.columns, n)
            for h in self.hotspots:  # leaves are disjoint: a row is in one at most
                inside = np.ones(n, dtype=bool)
                for column, op, threshold in h["conditions"]:
                    inside &= (X[:, column] <= threshold) if op == "<=" else (X[:, column] > threshold)
                ids[inside] = h["id"]
        return {OUTPUT: pa.array(ids, pa.string())}

    def to_blobs(self) -> dict[str, bytes]:
        return {"encoder.json": json.dumps(self.encoder.to_json()).encode(),
                "hotspots.json": json.dumps(self.hotspots).encode()}


class Hotspots:
    name = NAME
    reserved = ("hotspot_*",)

    def outputs(self, spec: ModelSpec) -> list[Output]:
        return [Output(OUTPUT, pa.string(), OUTPUT,
                       doc="the hotspot (a region where the model is often wrong) the row falls in; NULL: none")]

    def check_model(self, spec: ModelSpec, reference: pa.Schema | None = None) -> None:
        if spec.task not in ("binary_classification", "multiclass_classification"):
            raise Unusable("hotspots are regions where a classifier is wrong: the model is not a classifier")
        if reference is not None and "label" not in reference.names:
            raise Unusable("hotspots learn where the model is wrong from labels: the reference data has no "
                           "label column")

    def check_config(self, config: dict) -> dict:
        return _parameters(config)

    def check_quality(self, quality: dict, config: dict) -> None:
        """How many hotspots were found is reported, not judged: none is a good answer."""

    def stream_training(self, config: dict) -> StreamTraining:
        """Hotspots follow the stream's labels: the reference data plus the labelled rows
        of the last `stream_window` (at most `stream_rows`), retrained every `retrain_every`."""
        params = _parameters(config)
        every = params["retrain_every"]
        return StreamTraining(window=parse_window(params["stream_window"]), max_rows=params["stream_rows"],
                              every=None if every is None else parse_window(every),
                              texts={k: params[k] for k in ("stream_window", "stream_rows", "retrain_every")})

    def fit(self, spec: ModelSpec, reference: pa.Table, config: dict, model_file=None) -> HotspotsArtifact:
        from sklearn.tree import DecisionTreeClassifier  # here: training only

        params = _parameters(config)
        if "label" not in reference.column_names:
            raise ValueError("hotspots: the reference data has no label column")
        labelled = reference.filter(reference.column("label").is_valid())
        if labelled.num_rows < 2 * params["min_rows"]:
            raise ValueError(f"hotspots: {labelled.num_rows} labelled reference rows; at least "
                             f"{2 * params['min_rows']} (twice min_rows) are needed")
        encoder = FeatureEncoder.fit(spec, labelled, categorical="code", nulls="median")
        X = encoder.transform({n: labelled.column(n) for n in spec.feature_names}, labelled.num_rows)
        right = correct(spec, labelled.column("prediction").to_numpy(zero_copy_only=False),
                        labelled.column("label").to_numpy(zero_copy_only=False))
        weight, stream_rows = _weights(labelled, params["reference_share"])
        tree = DecisionTreeClassifier(max_depth=params["max_depth"], min_samples_leaf=params["min_rows"],
                                      random_state=params["random_state"]).fit(X, ~right, sample_weight=weight)
        found_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        hotspots = [{"conditions": conditions, "rows": size, "accuracy": accuracy,
                     "rules": _rules(conditions, encoder), "found_at": found_at}
                    for conditions, size, accuracy in _regions(tree, X, right, weight, params)]
        hotspots.sort(key=lambda h: (h["accuracy"], -h["rows"]))
        for k, h in enumerate(hotspots, 1):
            h["id"] = f"h{k}"
        quality = {"hotspots": len(hotspots), "rows": int(labelled.num_rows), "stream_rows": stream_rows,
                   "accuracy": float(np.average(right, weights=weight)),
                   "rows_in_hotspots": int(sum(h["rows"] for h in hotspots))}
        return HotspotsArtifact(encoder, hotspots, params, quality)

    def load(self, spec: ModelSpec, manifest: Manifest, blobs: dict[str, bytes]) -> HotspotsArtifact:
        encoder = FeatureEncoder.for_spec(json.loads(blobs["encoder.json"]), spec)
        parameters = {k: v for k, v in manifest.parameters.items() if k != "quality"}
        return HotspotsArtifact(encoder, json.loads(blobs["hotspots.json"]), parameters,
                                manifest.parameters.get("quality", {}))


def _weights(rows: pa.Table, reference_share: float) -> tuple[np.ndarray, int]:
    """Each row's weight, and how many came from the stream. A stream row weighs 1; a
    reference row as much, until the stream brings enough rows that the reference data
    together would weigh more than `reference_share` of all: then less, so that it weighs
    exactly that share (the past informs; the stream's labels say where the model is
    wrong now)."""
    weight = np.ones(rows.num_rows)
    if FROM_STREAM not in rows.column_names:
        return weight, 0
    stream = rows.column(FROM_STREAM).to_numpy(zero_copy_only=False).astype(bool)
    n_stream, n_reference = int(stream.sum()), int((~stream).sum())
    if n_stream and n_reference:
        share = reference_share
        weight[~stream] = min(1.0, share * n_stream / ((1 - share) * n_reference)) if share < 1 else 1.0
    return weight, n_stream


def _regions(tree, X: np.ndarray, right: np.ndarray, weight: np.ndarray,
             params: dict) -> list[tuple[list, int, float]]:
    """The tree's largest regions with low accuracy: from the root down, a node holding at
    least min_rows rows whose (weighted) accuracy is below the threshold is a hotspot (its
    subtree is not split further: one region is one hotspot, however the tree cut it); else
    its children are looked at. Each with the conditions on its path: [encoded column, '<=' or
    '>', threshold]."""
    t = tree.tree_
    path = tree.decision_path(X).tocsc()
    sizes = np.asarray(path.sum(axis=0)).ravel()
    weights = path.T @ weight
    rights = path.T @ (right * weight)
    out, stack = [], [(0, [])]
    while stack:
        node, conditions = stack.pop()
        size = int(sizes[node])
        accuracy = float(rights[node] / weights[node]) if size and weights[node] > 0 else 1.0
        if size >= params["min_rows"] and accuracy < params["accuracy_threshold"] and conditions:
            out.append((conditions, size, accuracy))
            continue
        left, right_child = t.children_left[node], t.children_right[node]
        if left == right_child:  # a leaf
            continue
        column, threshold = int(t.feature[node]), float(t.threshold[node])
        stack.append((left, conditions + [[column, "<=", threshold]]))
        stack.append((right_child, conditions + [[column, ">", threshold]]))
    return out


def _rules(conditions: list[list], encoder: FeatureEncoder) -> list[str]:
    """The conditions merged per feature into readable rules (at most one per feature)."""
    bounds: dict[int, list[float]] = {}
    for column, op, threshold in conditions:
        low, high = bounds.setdefault(column, [-np.inf, np.inf])
        bounds[column] = [low, min(high, threshold)] if op == "<=" else [max(low, threshold), high]
    rules = []
    for column, (low, high) in sorted(bounds.items()):
        name = encoder.names[column]
        if encoder.kinds[column] == "numeric":
            parts = ([f"{name} > {_num(low)}"] if low > -np.inf else []) + \
                    ([f"{name} <= {_num(high)}"] if high < np.inf else [])
            rules.append(" AND ".join(parts))
        else:  # a code range: the categories of those frequency ranks (-1: never seen in training)
            categories = encoder.categories[name]
            chosen = [c for k, c in enumerate(categories) if low < k <= high]
            unseen = low < -1 <= high
            if len(chosen) <= len(categories) - len(chosen):
                text = f"{name} IN ({', '.join(repr(c) for c in chosen)})" if chosen else f"{name} never seen"
                rules.append(text + (" or never seen in training" if unseen and chosen else ""))
            else:
                others = [repr(c) for c in categories if c not in chosen]
                rules.append(f"{name} NOT IN ({', '.join(others)})")
    return rules[:MAX_RULES]


def _num(x: float) -> str:
    return f"{x:.6g}"


def _parameters(config: dict) -> dict:
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"hotspots: unknown setting(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    params = {**DEFAULTS, **config}
    for key, low, high in (("max_depth", 1, MAX_RULES), ("min_rows", 1, 10**9), ("stream_rows", 0, 10**7)):
        v = params[key]
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise ValueError(f"hotspots.{key}: an integer from {low} to {high}, got {v!r}")
    t = params["accuracy_threshold"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
        raise ValueError(f"hotspots.accuracy_threshold: a number in (0, 1], got {t!r}")
    if not isinstance(params["random_state"], int):
        raise ValueError("hotspots.random_state: must be an integer")
    share = params["reference_share"]
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise ValueError(f"hotspots.reference_share: a number from 0 to 1, got {share!r}")
    for key in ("stream_window", "retrain_every"):
        if key == "retrain_every" and params[key] in (None, "off"):
            params[key] = None
            continue
        try:
            parse_window(params[key])
        except ValueError:
            raise ValueError(f"hotspots.{key}: a duration like 12h, 1d or 7d (s, m, h, d or w)"
                             + (", or off" if key == "retrain_every" else "") + f", got {params[key]!r}") from None
    return params
