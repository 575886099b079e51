"""Sample model and data for the demo, the tests and the benchmarks.

A credit-scoring-like binary classifier: 10 numeric features and one
categorical, a sensitive attribute (its groups scored unequally), a region
where the model is mostly wrong (HOTSPOT), labelled reference data drawn from
one distribution, and inferences from the same one with a few planted anomalies
(far outside the reference on several features at once, with an unseen
category) and, on request, malformed messages of every kind the worker must
dead-letter.
"""

from __future__ import annotations

import time

import numpy as np
import orjson
import pyarrow as pa

MODEL_ID = "credit_default"
NUMERIC = [f"f{i}" for i in range(10)]
REGIONS = ["north", "south", "east", "west"]
REGION_P = [0.4, 0.3, 0.2, 0.1]

SCHEMA = {
    "task": "binary_classification",
    "features": [{"name": n, "type": "numeric"} for n in NUMERIC] + [{"name": "region", "type": "categorical"}],
    "attributes": [{"name": "sex", "type": "categorical", "sensitive": True}],
    "positive_threshold": 0.5,
}


def malformed(model_id: str = MODEL_ID, max_bytes: int = 1_048_576) -> list[tuple[bytes, str]]:
    """One malformed message of each kind, with the reason the worker must give."""
    good = {"model_id": model_id, "inference_id": "bad", "timestamp": 1764000000000,
            "features": {**{n: 1.0 for n in NUMERIC}, "region": "north"}, "prediction": 0.5}

    def variant(**changes) -> bytes:
        msg = {**good, **changes}
        return orjson.dumps({k: v for k, v in msg.items() if v is not _DROP})

    nan_features = orjson.dumps(good["features"]).replace(b'"f0":1.0', b'"f0":NaN')
    huge_features = orjson.dumps(good["features"]).replace(b'"f2":1.0', b'"f2":' + b"9" * 400)
    return [
        (b"this is not json", "invalid_json"),
        (b"42", "not_an_object"),
        (variant(model_id=_DROP), "missing_field"),
        (variant(model_id=7), "wrong_type"),
        (variant(model_id="no_such_model"), "unknown_model"),
        (variant(timestamp="yesterday"), "invalid_timestamp"),
        (variant(features={"f0": 1.0}), "missing_feature"),
        (variant(features={**good["features"], "f1": "high"}), "wrong_feature_type"),
        (variant(features=_DROP)[:-1] + b',"features":' + nan_features + b"}", "non_finite"),
        (variant(padding="x" * max_bytes), "too_large"),
        (variant(features=_DROP)[:-1] + b',"features":' + huge_features + b"}", "out_of_range"),
        # a lone surrogate, as JSON escapes it (what a UTF-16 string with half a character becomes)
        (orjson.dumps(good).replace(b'"inference_id":"bad"', b'"inference_id":"bad\\ud800"'), "invalid_text"),
        (b"\xff\xff\xff\xff" + b"not an arrow stream", "invalid_arrow"),
    ]


_DROP = object()


def _features(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    cols = {name: rng.normal(loc=i * 0.5, scale=1.0 + 0.1 * i, size=n) for i, name in enumerate(NUMERIC)}
    cols["region"] = rng.choice(REGIONS, size=n, p=REGION_P)
    return cols


#: Where the sample model is wrong most of the time (its hotspot): these rows' labels
#: disagree with its decision 85% of the time, in the reference data and the stream alike.
HOTSPOT = {"region": "south", "f1_above": 1.5}


def _outcomes(rng: np.random.Generator, cols: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sample model's score, the true label and the sensitive attribute, for drawn features.

    The score is calibrated, except in HOTSPOT, where the labels mostly contradict it;
    `sex` is drawn with f is more likely where f0 (which raises the score) is low, so
    the raw decision selects fewer f's: a disparity for bias mitigation to close."""
    n = len(cols["f0"])
    logit = 0.8 * cols["f0"] - 0.5 * cols["f3"] + 0.3 * (cols["region"] == "west")
    prediction = 1 / (1 + np.exp(-logit))
    label = rng.random(n) < prediction
    blind = (cols["region"] == HOTSPOT["region"]) & (cols["f1"] > HOTSPOT["f1_above"])
    label = np.where(blind & (rng.random(n) < 0.85), prediction < 0.5, label)
    sex = np.where(rng.random(n) < 1 / (1 + np.exp(1.2 * cols["f0"])), "f", "m")
    return prediction, label.astype(np.int64), sex


def reference_table(n: int = 10_000, seed: int = 7) -> pa.Table:
    rng = np.random.default_rng(seed)
    cols = _features(rng, n)
    cols["prediction"], cols["label"], cols["sex"] = _outcomes(rng, cols)
    return pa.table(cols)


def inferences(n: int, anomalies: int = 0, seed: int = 11, model_id: str | list[str] = MODEL_ID,
               id_prefix: str = "inf", start_ms: int | None = None, attributes: bool = True,
               decimals: int | None = None, labels: list | None = None) -> tuple[list[bytes], set[str]]:
    """`n` JSON messages (`anomalies` of them planted, spread evenly) and the
    set of planted inference ids. A list of model ids spreads the messages
    over those models at random; `decimals` rounds the numbers (shorter messages).

    By default the prediction is a random number and `sex` alternates; given a
    list as `labels`, the sample model scores each row, `sex` is drawn as in the
    reference data, and the list receives each row's label update (a message with
    `model_id`, `inference_id` and `label`, to send later: a late label)."""
    rng = np.random.default_rng(seed)
    cols = _features(rng, n)
    outcomes = _outcomes(np.random.default_rng(seed + 1), cols) if labels is not None else None
    planted_rows = set(np.linspace(0, n - 1, anomalies, dtype=int).tolist()) if anomalies else set()
    # one millisecond apart, the last one now: a generated backlog never lies in the future
    # (a worker dead-letters timestamps ahead of its clock by more than ENRICHER_MAX_FUTURE_SKEW)
    start = int(time.time() * 1000) - n if start_ms is None else start_ms
    if decimals is not None:
        for name in NUMERIC:
            cols[name] = np.round(cols[name], decimals)
    models = rng.choice(model_id, size=n) if isinstance(model_id, list) else None
    out, planted = [], set()
    for i in range(n):
        feats = {name: float(cols[name][i]) for name in NUMERIC}
        feats["region"] = str(cols["region"][i])
        iid = f"{id_prefix}-{i:07d}"
        if i in planted_rows:
            for k, name in enumerate(NUMERIC[:6]):
                feats[name] = float(k * 0.5 + rng.choice([-1, 1]) * rng.uniform(6, 9))
            feats["region"] = "atlantis"
            planted.add(iid)
        msg = {"model_id": model_id if models is None else str(models[i]), "inference_id": iid,
               "timestamp": start + i, "features": feats, "prediction": round(float(rng.random()), 4)}
        if attributes:
            msg["attributes"] = {"sex": "f" if i % 2 else "m"}
        if outcomes is not None:
            msg["prediction"] = round(float(outcomes[0][i]), 4)
            msg["attributes"] = {"sex": str(outcomes[2][i])}
            labels.append(orjson.dumps({"model_id": msg["model_id"], "inference_id": iid,
                                        "label": int(outcomes[1][i])}))
        out.append(orjson.dumps(msg))
    return out, planted
