"""The user's own tree model, read without running any of its code, as a TreeEnsemble.

Formats (chosen by the file's name):
- `.json`: XGBoost's JSON model (`Booster.save_model("model.json")`);
- `.txt`: LightGBM's text model (`Booster.save_model("model.txt")`).

Both are parsed here into the flat arrays of models/treeshap.py, so serving
needs neither library. A pickle (`.pkl`, `.pickle`, `.joblib`, or any file that
starts like one) is refused: loading it would run whatever code it holds.

What is explained is the model's raw output (its margin): the regression
value, a binary classifier's log-odds, a multiclass model's per-class margin.
`link` says how the margin maps to the prediction the model sends (`identity`,
`logistic`, `exp`, `softmax`), which training uses to check that the file is
the model that made the reference predictions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

from .treeshap import TreeEnsemble

MAX_BYTES = 512 << 20
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".sav", ".dill", ".cloudpickle")
FORMATS = {".json": "xgboost-json", ".txt": "lightgbm-text"}

# XGBoost objectives by how their margin becomes the prediction.
_XGB_LINKS = {
    "reg:squarederror": "identity", "reg:squaredlogerror": "identity", "reg:absoluteerror": "identity",
    "reg:pseudohubererror": "identity", "reg:quantileerror": "identity", "reg:linear": "identity",
    "binary:logistic": "logistic", "reg:logistic": "logistic", "binary:logitraw": "identity",
    "count:poisson": "exp", "reg:gamma": "exp", "reg:tweedie": "exp",
    "multi:softprob": "softmax", "multi:softmax": "softmax",
}
_LGB_LINKS = {"regression": "identity", "regression_l1": "identity", "huber": "identity", "fair": "identity",
              "quantile": "identity", "mape": "identity", "binary": "logistic", "cross_entropy": "logistic",
              "poisson": "exp", "gamma": "exp", "tweedie": "exp", "multiclass": "softmax",
              "multiclassova": "logistic"}


class ModelFileError(ValueError):
    """A model file we will not or cannot read; the message says what to do instead."""


@dataclass
class UserModel:
    ensemble: TreeEnsemble
    format: str
    objective: str
    link: str
    feature_names: list[str] = field(default_factory=list)


def check_name(name: str) -> str:
    """The format a file name says, or ModelFileError (a pickle is refused here, before reading it)."""
    lower = name.lower().split("?", 1)[0]
    if lower.endswith(PICKLE_SUFFIXES):
        raise ModelFileError(f"model file {name!r}: a pickle is refused (loading it would run the code it holds); "
                             "save the model as XGBoost JSON (booster.save_model('model.json')) or LightGBM text "
                             "(booster.save_model('model.txt'))")
    for suffix, fmt in FORMATS.items():
        if lower.endswith(suffix):
            return fmt
    raise ModelFileError(f"model file {name!r}: use an XGBoost JSON model (.json) or a LightGBM text model (.txt)")


def load(name: str, data: bytes, n_features: int) -> UserModel:
    fmt = check_name(name)
    if len(data) > MAX_BYTES:
        raise ModelFileError(f"model file {name!r}: {len(data):,} bytes, more than {MAX_BYTES:,}")
    if data[:1] == b"\x80" or data[:2] in (b"\x1f\x8b",):  # a pickle's protocol opcode, or gzip (joblib)
        raise ModelFileError(f"model file {name!r} is a pickle or compressed pickle, whatever its name; it is "
                             "refused (loading it would run the code it holds)")
    try:
        model = _xgboost(data) if fmt == "xgboost-json" else _lightgbm(data)
    except ModelFileError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"model file {name!r} is not a {fmt} model we can read: {type(exc).__name__}: "
                             f"{str(exc)[:200]}") from None
    if model.ensemble.n_features != n_features:
        raise ModelFileError(f"model file {name!r} has {model.ensemble.n_features} features, the schema "
                             f"{n_features}: its features must be the schema's, in the schema's order")
    return model


def _build(trees: list[dict], n_features: int, init, strict: bool, fmt: str, objective: str, link: str,
           names: list[str]) -> UserModel:
    """`trees`: per tree, node arrays (parents before children), and its output."""
    parts = {k: [] for k in ("left", "right", "feature", "threshold", "value", "cover")}
    node_start, tree_output, offset = [0], [], 0
    for t in trees:
        left = np.asarray(t["left"], np.int64)
        leaf = left < 0
        parts["left"].append(np.where(leaf, -1, left + offset))
        parts["right"].append(np.where(leaf, -1, np.asarray(t["right"], np.int64) + offset))
        parts["feature"].append(np.where(leaf, 0, t["feature"]))
        parts["threshold"].append(np.where(leaf, 0.0, t["threshold"]))
        parts["value"].append(np.where(leaf, t["value"], 0.0))
        parts["cover"].append(np.asarray(t["cover"], np.float64))
        offset += len(left)
        node_start.append(offset)
        tree_output.append(t["output"])
    arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    ensemble = TreeEnsemble(**arrays, node_start=node_start, tree_output=tree_output, init=init,
                            n_features=n_features, strict=strict, tables={})
    ensemble.check_structure()
    return UserModel(TreeEnsemble(**arrays, node_start=node_start, tree_output=tree_output, init=init,
                                  n_features=n_features, strict=strict), fmt, objective, link, names)


def _xgboost(data: bytes) -> UserModel:
    doc = json.loads(data)
    learner = doc["learner"]
    objective = learner["objective"]["name"]
    if objective not in _XGB_LINKS:
        raise ModelFileError(f"XGBoost objective {objective!r} is not one we explain; known: {sorted(_XGB_LINKS)}")
    link = _XGB_LINKS[objective]
    booster = learner["gradient_booster"]
    if booster.get("name") != "gbtree":
        raise ModelFileError(f"XGBoost booster {booster.get('name')!r}: only gbtree models are trees to explain")
    model = booster["model"]
    params = learner["learner_model_param"]
    n_features = int(params["num_feature"])
    n_class = int(params.get("num_class", 0) or 0)
    outputs = max(1, n_class)
    base = np.atleast_1d(np.asarray(json.loads(params["base_score"]) if params["base_score"].startswith("[")
                                    else float(params["base_score"]), np.float64))
    base = np.resize(base, outputs)
    if link == "logistic" and objective != "binary:logitraw":  # stored as a probability, applied as a margin
        base = np.log(base / (1 - base))
    elif link == "exp":
        base = np.log(base)
    trees = []
    for tree, output in zip(model["trees"], model["tree_info"]):
        if any(int(s) != 0 for s in tree.get("split_type", [])):
            raise ModelFileError("the XGBoost model has categorical splits; we explain numerical splits only")
        left, right = tree["left_children"], tree["right_children"]
        trees.append({"left": left, "right": right, "feature": tree["split_indices"],
                      "threshold": np.asarray(tree["split_conditions"], np.float32).astype(np.float64),
                      "value": tree["split_conditions"], "cover": tree["sum_hessian"], "output": int(output)})
    return _build(trees, n_features, base, True, "xgboost-json", objective, link,
                  list(learner.get("feature_names") or []))


def _lightgbm(data: bytes) -> UserModel:
    text = data.decode("utf-8")
    if not text.startswith("tree\n"):
        raise ModelFileError("not a LightGBM text model (it starts with 'tree')")
    header, _, rest = text.partition("\nTree=")
    head = dict(line.split("=", 1) for line in header.splitlines() if "=" in line)
    objective = head.get("objective", "").split()[0] if head.get("objective") else ""
    if objective not in _LGB_LINKS:
        raise ModelFileError(f"LightGBM objective {objective!r} is not one we explain; known: {sorted(_LGB_LINKS)}")
    outputs = int(head.get("num_tree_per_iteration", 1))
    n_features = int(head["max_feature_idx"]) + 1
    body = "Tree=" + rest.split("\nend of trees", 1)[0]
    trees = []
    for k, block in enumerate(re.split(r"\nTree=", "\n" + body)[1:]):
        f = dict(line.split("=", 1) for line in block.splitlines()[1:] if "=" in line)
        leaves = int(f["num_leaves"])
        leaf_value = np.array(f["leaf_value"].split(), np.float64)
        leaf_count = np.array(f["leaf_count"].split(), np.float64) if leaves > 1 else np.ones(1)
        if leaves == 1:  # a tree of one leaf
            trees.append({"left": [-1], "right": [-1], "feature": [0], "threshold": [0.0], "value": leaf_value,
                          "cover": leaf_count, "output": k % outputs})
            continue
        if int(f.get("num_cat", "0")) > 0:
            raise ModelFileError("the LightGBM model has categorical splits; we explain numerical splits only")
        inner = leaves - 1
        decision = np.array(f["decision_type"].split(), np.int64)
        if np.any(decision & 1):
            raise ModelFileError("the LightGBM model has categorical splits; we explain numerical splits only")

        def node(child: int) -> int:  # a leaf is ~index in LightGBM; ours follow the splits
            return child if child >= 0 else inner + (~child)

        left = [node(int(c)) for c in f["left_child"].split()]
        right = [node(int(c)) for c in f["right_child"].split()]
        cover = np.concatenate([np.array(f["internal_count"].split(), np.float64), leaf_count])
        trees.append({"left": left + [-1] * leaves, "right": right + [-1] * leaves,
                      "feature": [int(v) for v in f["split_feature"].split()] + [0] * leaves,
                      "threshold": [float(v) for v in f["threshold"].split()] + [0.0] * leaves,
                      "value": np.concatenate([np.zeros(inner), leaf_value]), "cover": cover,
                      "output": k % outputs})
    names = head.get("feature_names", "").split()
    return _build(trees, n_features, np.zeros(outputs), False, "lightgbm-text", objective, _LGB_LINKS[objective],
                  names)


def to_prediction(margins: np.ndarray, link: str) -> np.ndarray:
    """The model's prediction from its margins (rows, outputs): what it would have sent."""
    if link == "identity":
        return margins
    if link == "logistic":
        return 1 / (1 + np.exp(-margins))
    if link == "exp":
        return np.exp(margins)
    shifted = np.exp(margins - margins.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)

