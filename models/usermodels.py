"""The user's own tree model, read without running any of its code, as a TreeEnsemble.

Formats (chosen by the file's name):
- `.json`: XGBoost's JSON model (`Booster.save_model("model.json")`);
- `.ubj`: the same as UBJSON, XGBoost's binary form (`Booster.save_model("model.ubj")`);
- `.txt`: LightGBM's text model (`Booster.save_model("model.txt")`);
- `.skops`: a scikit-learn tree model (gradient boosting, HistGradientBoosting,
  random forest, extra trees, a decision tree: models/sklearntrees.py) saved
  with skops (`skops.io.dump(model, "model.skops")`), loaded with skops' type
  checks: a type skops does not trust, other than a fitted tree, is refused by
  name before anything is loaded.

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
import math
import re
from dataclasses import dataclass, field

import numpy as np

from enricher.errors import EnricherError

from . import sklearntrees
from .treeshap import CAT_SET_RIGHT, CATEGORICAL, DEFAULT_LEFT, NAN_AS_ZERO, ZERO_MISSING, TreeEnsemble

MAX_BYTES = 512 << 20
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".sav", ".dill", ".cloudpickle")
FORMATS = {".json": "xgboost-json", ".ubj": "xgboost-ubjson", ".txt": "lightgbm-text", ".skops": "sklearn-skops"}
# What a skops file may hold beyond what skops itself trusts: the fitted trees of scikit-learn's
# tree models (arrays, no code).
SKOPS_TRUSTED = frozenset({"sklearn.tree._tree.Tree",
                           "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"})

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


class ModelFileError(EnricherError, ValueError):
    """A model file we will not or cannot read; the message says what to do instead."""


@dataclass
class UserModel:
    ensemble: TreeEnsemble
    format: str
    objective: str
    link: str
    feature_names: list[str] = field(default_factory=list)
    classes: list[str] | None = None  # a classifier's class labels, where the file names them
    note: str = ""  # how the file was read where a choice was made (early stopping's best iteration)
    rounds: int = 0  # boosting rounds used (XGBoost: where early stopping cut the trees)
    scale: float = 1.0  # our margin per library raw score (LightGBM rf: its raw score is the trees' sum)
    library_model: object = None  # a skops file's estimator, as loaded (to check our reading against)
    # A categorical feature's categories by the model's code (index: code), by feature position,
    # where the file names them (LightGBM's pandas_categorical, XGBoost's cats); a feature the
    # model splits by category without naming them takes its codes as numbers.
    categories: dict[int, list[str]] = field(default_factory=dict)
    categorical_features: frozenset[int] = frozenset()


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
    raise ModelFileError(f"model file {name!r}: use an XGBoost JSON (.json) or UBJSON (.ubj) model, a LightGBM "
                         "text model (.txt), or a scikit-learn tree model saved with skops (.skops)")


def load(name: str, data: bytes, n_features: int, missing: float | None = None,
         iterations: str = "best") -> UserModel:
    """`missing`: a value the model was trained to read as missing besides NaN (XGBoost's
    `missing` parameter: the file does not carry it). `iterations`: an XGBoost model trained
    with early stopping is cut at its `best_iteration`, as the library's scikit-learn
    `predict` does (`best`), or used whole, as `Booster.predict` does (`all`)."""
    fmt = check_name(name)
    if len(data) > MAX_BYTES:
        raise ModelFileError(f"model file {name!r}: {len(data):,} bytes, more than {MAX_BYTES:,}")
    if data[:1] == b"\x80" or data[:2] in (b"\x1f\x8b",):  # a pickle's protocol opcode, or gzip (joblib)
        raise ModelFileError(f"model file {name!r} is a pickle or compressed pickle, whatever its name; it is "
                             "refused (loading it would run the code it holds)")
    try:
        if fmt == "lightgbm-text":
            model = _lightgbm(data, missing)
        elif fmt == "sklearn-skops":
            model = _skops(data, missing)
        else:
            model = _xgboost(json.loads(data) if fmt == "xgboost-json" else ubjson(data), fmt, missing, iterations)
    except ModelFileError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelFileError(f"model file {name!r} is not a {fmt} model we can read: {type(exc).__name__}: "
                             f"{str(exc)[:200]}") from None
    if model.ensemble.n_features != n_features:
        raise ModelFileError(f"model file {name!r} has {model.ensemble.n_features} features, the schema "
                             f"{n_features}: its features must be the schema's, in the schema's order")
    return model


def _build(trees: list[dict], n_features: int, init, strict: bool, fmt: str, objective: str, link: str,
           names: list[str], precision: int, missing: float | None, note: str = "",
           flush_zero: bool = False) -> UserModel:
    """`trees`: per tree, node arrays (parents before children), and its output."""
    parts = {k: [] for k in ("left", "right", "feature", "threshold", "value", "cover", "decision")}
    node_start, tree_output, offset = [0], [], 0
    cat_offset, cat_words, cat_bits, bits_at = [], [], [], 0
    for t in trees:
        for words in t.get("cat_words") or [None] * len(t["left"]):  # per node: its bitset, or None
            cat_offset.append(bits_at if words is not None else 0)
            cat_words.append(len(words) if words is not None else 0)
            if words is not None:
                cat_bits.append(np.asarray(words, np.uint32))
                bits_at += len(words)
        left = np.asarray(t["left"], np.int64)
        leaf = left < 0
        parts["left"].append(np.where(leaf, -1, left + offset))
        parts["right"].append(np.where(leaf, -1, np.asarray(t["right"], np.int64) + offset))
        parts["feature"].append(np.where(leaf, 0, t["feature"]))
        parts["threshold"].append(np.where(leaf, 0.0, t["threshold"]))
        parts["value"].append(np.where(leaf, t["value"], 0.0))
        parts["cover"].append(np.asarray(t["cover"], np.float64))
        parts["decision"].append(np.where(leaf, 0, np.asarray(t["decision"], np.int64)))
        offset += len(left)
        node_start.append(offset)
        tree_output.append(t["output"])
    arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    arrays.update(cat_offset=np.asarray(cat_offset, np.int64), cat_words=np.asarray(cat_words, np.int64),
                  cat_bits=np.concatenate(cat_bits) if cat_bits else np.zeros(0, np.uint32))
    how = dict(node_start=node_start, tree_output=tree_output, init=init, n_features=n_features, strict=strict,
               precision=precision, missing=float("nan") if missing is None else float(missing),
               flush_zero=flush_zero)
    TreeEnsemble(**arrays, **how, tables={}).check_structure()
    return UserModel(TreeEnsemble(**arrays, **how), fmt, objective, link, names, note=note)


def _xgboost(doc: dict, fmt: str, missing: float | None, iterations: str) -> UserModel:
    learner = doc["learner"]
    objective = learner["objective"]["name"]
    if objective not in _XGB_LINKS:
        raise ModelFileError(f"XGBoost objective {objective!r} is not one we explain; known: {sorted(_XGB_LINKS)}")
    link = _XGB_LINKS[objective]
    booster = learner["gradient_booster"]
    if booster.get("name") == "dart":
        raise ModelFileError("XGBoost booster 'dart': its trees are weighted at prediction by drop-out scale "
                             "factors we do not apply; train with booster='gbtree' to have it explained")
    if booster.get("name") != "gbtree":
        raise ModelFileError(f"XGBoost booster {booster.get('name')!r}: only gbtree models are trees to explain")
    model = model_doc = booster["model"]
    params = learner["learner_model_param"]
    n_features = int(params["num_feature"])
    n_class = int(params.get("num_class", 0) or 0)
    targets = int(params.get("num_target", 1) or 1)
    if targets > 1:
        raise ModelFileError(f"the XGBoost model predicts {targets} targets (multi-output); an inference here has "
                             "one prediction: register one model per target")
    outputs = max(1, n_class)
    base = np.atleast_1d(np.asarray(json.loads(params["base_score"]) if params["base_score"].startswith("[")
                                    else float(params["base_score"]), np.float64))
    base = np.resize(base, outputs)
    if link == "logistic" and objective != "binary:logitraw":  # stored as a probability, applied as a margin
        base = np.log(base / (1 - base))
    elif link == "exp":
        base = np.log(base)
    if len(model["trees"]) != len(model["tree_info"]):
        raise ValueError("the model's tree_info does not match its trees")
    # Trees per boosting round: classes x num_parallel_tree (a forest per round); the file
    # says where each round starts (iteration_indptr), else rounds are equal.
    per_round = outputs * int(model.get("gbtree_model_param", {}).get("num_parallel_tree", 1) or 1)
    indptr = model.get("iteration_indptr")
    indptr = (list(indptr) if indptr is not None and len(indptr) else list(range(0, len(model["trees"]) + 1,
                                                                                   per_round)))
    if indptr[-1] != len(model["trees"]) or any(b < a for a, b in zip(indptr, indptr[1:])):
        raise ValueError("the model's iteration_indptr does not match its trees")
    rounds = len(indptr) - 1
    used, note = len(model["trees"]), ""
    best = learner.get("attributes", {}).get("best_iteration")
    if best is not None and iterations == "best" and 0 <= int(best) < rounds - 1:
        used = indptr[int(best) + 1]
        note = (f"early stopping: rounds 0..{int(best)} of {rounds} (best_iteration), as the XGBoost estimator's "
                "predict uses them; set explainability.iterations='all' for every round, as Booster.predict")
    trees, categorical = [], set()
    for tree, output in zip(model["trees"][:used], model["tree_info"][:used]):
        if int(tree.get("tree_param", {}).get("size_leaf_vector", 1) or 1) > 1:
            raise ModelFileError("the XGBoost model has vector leaves (multi_strategy='multi_output_tree'); we "
                                 "explain one output per tree")
        left, right = tree["left_children"], tree["right_children"]
        n = len(left)
        if not all(len(tree[k]) == n for k in ("right_children", "split_indices", "split_conditions", "sum_hessian",
                                                "default_left")):
            raise ValueError("a tree's node arrays differ in length")
        decision = np.where(np.asarray(tree["default_left"], np.int64) != 0, DEFAULT_LEFT, 0)
        threshold = np.asarray(tree["split_conditions"], np.float32).astype(np.float64)
        cat_words = None
        split_type = np.asarray(tree.get("split_type", np.zeros(n)), np.int64)
        if len(split_type) != n or np.any((split_type != 0) & (split_type != 1)):
            raise ValueError("a tree's split_type is not one per node, 0 or 1")
        if split_type.any():  # categorical splits: the categories listed per node go right
            cat_words = [None] * n
            codes = np.asarray(tree["categories"], np.int64)
            for node, start, size in zip(tree["categories_nodes"], tree["categories_segments"],
                                         tree["categories_sizes"]):
                node, start, size = int(node), int(start), int(size)
                chosen = codes[start:start + size]
                if not 0 <= node < n or split_type[node] != 1 or start < 0 or start + size > len(codes) \
                        or (size and (chosen.min() < 0 or chosen.max() >= 1 << 24)):
                    raise ValueError("a tree's categorical split lists are inconsistent")
                cat_words[node] = _bitset(chosen)
                decision[node] |= CATEGORICAL | CAT_SET_RIGHT
                threshold[node] = 0.0
            if any(split_type[k] == 1 and cat_words[k] is None for k in range(n)):
                raise ValueError("a categorical split without its categories")
            categorical.update(int(f) for f, kind in zip(tree["split_indices"], split_type) if kind == 1)
        trees.append({"left": left, "right": right, "feature": tree["split_indices"], "threshold": threshold,
                      "value": tree["split_conditions"], "cover": tree["sum_hessian"], "decision": decision,
                      "cat_words": cat_words, "output": int(output)})
    model = _build(trees, n_features, base, True, fmt, objective, link,
                   [str(n) for n in learner.get("feature_names", [])], 32, missing, note)
    model.rounds = next(r for r in range(rounds + 1) if indptr[r] == used)
    model.categorical_features = frozenset(categorical)
    model.categories = _xgboost_categories(model_doc.get("cats"), n_features)
    return model


def _bitset(codes: np.ndarray) -> np.ndarray:
    """Category codes as 32-bit words, bit c of word c // 32 set for each code c."""
    words = np.zeros(int(codes.max()) // 32 + 1 if len(codes) else 1, np.uint32)
    np.bitwise_or.at(words, codes // 32, (np.uint32(1) << (codes % 32).astype(np.uint32)))
    return words


def _xgboost_categories(cats, n_features: int) -> dict[int, list[str]]:
    """XGBoost 3's record of each categorical feature's categories (the model's code is the
    position in the list): strings as UTF-8 bytes with offsets, numbers as values."""
    if not cats or not cats.get("enc"):
        return {}
    out = {}
    for j, enc in enumerate(cats["enc"][:n_features]):
        values = enc.get("values", [])
        if "offsets" in enc:
            offsets = [int(v) for v in enc["offsets"]]
            data = bytes(int(v) & 0xFF for v in values)
            names = [data[a:b].decode("utf-8") for a, b in zip(offsets, offsets[1:])]
        else:
            names = [_category_name(v) for v in values]
        if names:
            out[j] = names
    return out


def _category_name(value) -> str:
    """A category as the schema's string: 3 for 3.0, as pandas would print an integer category."""
    number = float(value)
    return str(int(number)) if number.is_integer() else str(value)


def _lightgbm(data: bytes, missing: float | None) -> UserModel:
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
    body, _, tail = rest.partition("\nend of trees")
    body = "Tree=" + body
    trees, categorical = [], set()
    for k, block in enumerate(re.split(r"\nTree=", "\n" + body)[1:]):
        f = dict(line.split("=", 1) for line in block.splitlines()[1:] if "=" in line)
        if f.get("is_linear", "0").strip() not in ("", "0"):
            raise ModelFileError("the LightGBM model has linear leaves (linear_tree=True): a leaf's output depends "
                                 "on the row through its own linear model, which path-dependent TreeSHAP does not "
                                 "attribute; train with linear_tree=False to have it explained")
        leaves = int(f["num_leaves"])
        leaf_value = np.array(f["leaf_value"].split(), np.float64)
        if leaves < 1 or len(leaf_value) != leaves:
            raise ValueError(f"tree {k}: num_leaves={leaves} but {len(leaf_value)} leaf values")
        leaf_count = np.array(f["leaf_count"].split(), np.float64) if leaves > 1 else np.ones(1)
        if leaves == 1:  # a tree of one leaf
            trees.append({"left": [-1], "right": [-1], "feature": [0], "threshold": [0.0], "value": leaf_value,
                          "cover": leaf_count, "decision": [0], "output": k % outputs})
            continue
        inner = leaves - 1
        decision = np.array(f["decision_type"].split(), np.int64)

        def node(child: int) -> int:  # a leaf is ~index in LightGBM; ours follow the splits
            return child if child >= 0 else inner + (~child)

        left = [node(int(c)) for c in f["left_child"].split()]
        right = [node(int(c)) for c in f["right_child"].split()]
        cover = np.concatenate([np.array(f["internal_count"].split(), np.float64), leaf_count])
        sizes = {len(left), len(right), len(f["split_feature"].split()), len(f["threshold"].split()),
                 len(cover) - leaves, len(decision)}
        if sizes != {inner} or len(leaf_count) != leaves:
            raise ValueError(f"tree {k}: its arrays do not match num_leaves={leaves}")
        # decision_type: bit 1 default_left, bits 2-3 missing_type (0 None, 1 Zero, 2 NaN)
        missing_type = (decision >> 2) & 3
        if np.any(missing_type == 3):
            raise ValueError(f"tree {k}: unknown missing_type in decision_type")
        rule = (np.where(decision & 2, DEFAULT_LEFT, 0) | np.where(missing_type == 1, ZERO_MISSING, 0)
                | np.where(missing_type != 2, NAN_AS_ZERO, 0))
        threshold = np.array(f["threshold"].split(), np.float64)
        feature = [int(v) for v in f["split_feature"].split()]
        cat_words = None
        if np.any(decision & 1):  # categorical splits: threshold indexes the tree's bitsets; the set goes left
            bounds = np.array(f["cat_boundaries"].split(), np.int64)
            words = np.array(f["cat_threshold"].split(), np.uint64)
            if len(bounds) != int(f.get("num_cat", "0")) + 1 or bounds[0] != 0 or bounds[-1] != len(words) \
                    or np.any(np.diff(bounds) < 0) or np.any(words >> np.uint64(32)):
                raise ValueError(f"tree {k}: its categorical bitsets are inconsistent")
            cat_words = [None] * (inner + leaves)
            for j in np.flatnonzero(decision & 1):
                index = int(threshold[j])
                if not 0 <= index < len(bounds) - 1 or index != threshold[j]:
                    raise ValueError(f"tree {k}: a categorical split names bitset {threshold[j]}")
                cat_words[j] = words[bounds[index]:bounds[index + 1]].astype(np.uint32)
                rule[j] = CATEGORICAL  # NaN goes right, whatever the missing type

                threshold[j] = 0.0
                categorical.add(feature[j])
        trees.append({"left": left + [-1] * leaves, "right": right + [-1] * leaves,
                      "feature": feature + [0] * leaves, "threshold": list(threshold) + [0.0] * leaves,
                      "value": np.concatenate([np.zeros(inner), leaf_value]), "cover": cover,
                      "decision": np.concatenate([rule, np.zeros(leaves, np.int64)]), "cat_words": cat_words,
                      "output": k % outputs})
    rounds = max(1, len(trees) // outputs)
    average = "average_output" in header.splitlines()
    if average:  # boosting='rf': predict is the trees' mean per class (raw_score and pred_contrib: their sum)
        for t in trees:
            t["value"] = np.asarray(t["value"], np.float64) / rounds
    names = head.get("feature_names", "").split()
    model = _build(trees, n_features, np.zeros(outputs), False, "lightgbm-text", objective, _LGB_LINKS[objective],
                   names, 64, missing, "boosting=rf: the trees' mean, as predict gives it" if average else "",
                   flush_zero=True)
    model.rounds, model.scale = rounds, (1.0 / rounds if average else 1.0)
    model.categorical_features = frozenset(categorical)
    model.categories = _lightgbm_categories(tail, head.get("feature_infos", "").split(), n_features)
    return model


def _lightgbm_categories(tail: str, infos: list[str], n_features: int) -> dict[int, list[str]]:
    """The categories LightGBM's pandas interface recorded (`pandas_categorical`, one list per
    categorical column, in column order; the model's code is the position in the list).
    Which features are categorical: their `feature_infos` list codes (`0:2:1`), not a range."""
    line = next((ln for ln in tail.splitlines() if ln.startswith("pandas_categorical:")), None)
    if line is None:
        return {}
    lists = json.loads(line.split(":", 1)[1])
    if not lists:
        return {}
    positions = [j for j, info in enumerate(infos[:n_features]) if info != "none" and not info.startswith("[")]
    if len(positions) != len(lists) or not all(isinstance(c, list) for c in lists):
        raise ValueError("pandas_categorical does not match the model's categorical features")
    return {j: [_category_name(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
                for v in values] for j, values in zip(positions, lists)}


def _skops(data: bytes, missing: float | None) -> UserModel:
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:  # noqa: BLE001 - skops raises many kinds on a damaged file
        raise ModelFileError(f"not a skops file we can read: {type(exc).__name__}: {str(exc)[:200]}") from None
    unexpected = sorted(set(untrusted) - SKOPS_TRUSTED)
    if unexpected:
        raise ModelFileError(f"the skops file holds types we do not load: {', '.join(unexpected)}; a scikit-learn "
                             f"tree model is expected ({', '.join(sklearntrees.SUPPORTED)})")
    try:
        model = sio.loads(data, trusted=list(untrusted))
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"the skops file could not be loaded: {type(exc).__name__}: {str(exc)[:200]}") from None
    try:
        ensemble = sklearntrees.ensemble(model)
    except sklearntrees.UnsupportedModel as exc:
        raise ModelFileError(f"the skops file holds {exc}") from None
    if missing is not None:
        ensemble.missing = float(missing)
    names = [str(n) for n in getattr(model, "feature_names_in_", [])]
    if not sklearntrees.is_classifier(model):
        return UserModel(ensemble, "sklearn-skops", "regression", "identity", names, library_model=model)
    classes = [str(c) for c in model.classes_]
    boosted = type(model).__name__ in sklearntrees.GRADIENT_BOOSTING + sklearntrees.HIST_GRADIENT_BOOSTING
    # boosting explains margins (one for two classes); a forest or tree its class probabilities
    link = ("logistic" if ensemble.n_outputs == 1 else "softmax") if boosted else "identity"
    return UserModel(ensemble, "sklearn-skops", "classification", link, names, classes, library_model=model)


def check_schema(model: UserModel, spec, predicted_classes: list[str] | None = None) -> dict[str, list[str]]:
    """The file against the schema, at registration (and again at training): feature names
    and order, the task and prediction type its outputs can serve, and for class labels the
    reference's classes among the model's. Returns each categorical feature's categories.
    ModelFileError names both sides."""
    names = [c.name for c in spec.features]
    generic = ([f"f{i}" for i in range(len(names))], [f"Column_{i}" for i in range(len(names))])
    if model.feature_names and model.feature_names not in generic and model.feature_names != names:
        raise ModelFileError(f"the model file's features are {model.feature_names}, the schema's {names}: they "
                             "must be the same, in the same order")
    outputs = model.ensemble.n_outputs
    classifier = model.link in ("logistic", "softmax") or model.classes is not None
    kind = ("a regression model" if not classifier else
            f"a classifier of {len(model.classes)} classes" if model.classes else
            "a binary classifier" if outputs == 1 else f"a classifier of {outputs} classes")
    what = f"the model file is {kind} (objective {model.objective!r})"
    if spec.task == "regression" and classifier:
        raise ModelFileError(f"{what}; the schema's task is regression")
    if spec.task != "regression" and not classifier:
        raise ModelFileError(f"{what}; the schema's task is {spec.task}")
    classes = model.classes or ([str(k) for k in range(outputs)] if outputs > 1 else None)
    if spec.task == "multiclass_classification" and (classes is None or len(classes) < 3):
        raise ModelFileError(f"{what}; the schema's task is multiclass_classification (3 classes or more)")
    if spec.task == "binary_classification" and classes is not None and len(classes) != 2:
        raise ModelFileError(f"{what}; the schema's task is binary_classification")
    forest_score = outputs == 2 and model.link == "identity"  # P(class 1) sent as a score
    if spec.prediction_type == "numeric" and outputs > 1 and not forest_score:
        raise ModelFileError(f"{what}, one output per class; the schema's predictions are numbers: send the "
                             "class as a categorical prediction (prediction_type: categorical)")
    if spec.prediction_type == "categorical" and outputs == 1:
        raise ModelFileError(f"{what} with one output (a score or a value); the schema's predictions are class "
                             "labels: send the score as the prediction (prediction_type: numeric)")
    if spec.prediction_type == "categorical" and predicted_classes is not None:
        unknown = sorted(set(predicted_classes) - set(classes or []))
        if unknown:
            raise ModelFileError(f"the reference predicts classes {unknown[:10]} the model file does not have; its "
                                 f"classes are {classes} (a booster's are 0..K-1: send those)")
    return schema_categories(model, [(c.name, c.numeric) for c in spec.features])


def schema_categories(model: UserModel, features: list[tuple[str, bool]]) -> dict[str, list[str]]:
    """For each categorical schema feature (`(name, numeric)` in schema order), the model's own
    categories, by code: the strings a message sends become the codes the model was trained on
    (a string the model never saw: a missing value, as pandas and the libraries make it)."""
    out = {}
    for j, (name, numeric) in enumerate(features):
        if numeric:
            continue
        if j not in model.categories:
            how = ("it splits on its codes, but the file does not name its categories (train on a pandas "
                   "'category' column: LightGBM records them as pandas_categorical, XGBoost 3 as cats); or "
                   "send the codes as a numeric feature" if j in model.categorical_features else
                   "the model treats it as a number: make it numeric in the schema")
            raise ModelFileError(f"feature {name!r} is categorical in the schema, but not in the model file: {how}")
        out[name] = model.categories[j]
    return out


def library_margins(model: UserModel, data: bytes, X: np.ndarray) -> tuple[str, np.ndarray] | None:
    """The model's library's own raw outputs on rows X, (rows, outputs), in our margin's units,
    with the library's name and version; None when the library is not installed here. What
    training checks our reading of the file against (the library reads the file as data:
    XGBoost JSON/UBJSON and LightGBM text hold no code)."""
    try:
        if model.format.startswith("xgboost"):
            import xgboost

            booster = xgboost.Booster()
            booster.load_model(bytearray(data))
            missing = model.ensemble.missing
            # the model's own feature names and types (a categorical feature's codes read as codes)
            rows = xgboost.DMatrix(X, missing=missing, feature_names=booster.feature_names,
                                   feature_types=booster.feature_types, enable_categorical=True)
            raw = booster.predict(rows, output_margin=True, iteration_range=(0, model.rounds))
            return f"xgboost {xgboost.__version__}", np.asarray(raw, np.float64).reshape(len(X), -1)
        if model.format == "lightgbm-text":
            import lightgbm

            booster = lightgbm.Booster(model_str=data.decode("utf-8"))
            X = X if math.isnan(model.ensemble.missing) else np.where(X == model.ensemble.missing, np.nan, X)
            raw = booster.predict(X, raw_score=True)
            return f"lightgbm {lightgbm.__version__}", np.asarray(raw, np.float64).reshape(len(X), -1) * model.scale
    except ImportError:
        return None
    estimator = model.library_model
    if estimator is None:
        return None
    import sklearn

    X = X if math.isnan(model.ensemble.missing) else np.where(X == model.ensemble.missing, np.nan, X)
    return f"scikit-learn {sklearn.__version__}", sklearntrees.raw_output(estimator, X)


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



# -- UBJSON (XGBoost's binary model format: `booster.save_model("model.ubj")`) ------------------

_UBJ_NUMBERS = {b"i": ">i1", b"U": ">u1", b"I": ">i2", b"l": ">i4", b"L": ">i8", b"d": ">f4", b"D": ">f8"}
_UBJ_DEPTH = 64


def ubjson(data: bytes):
    """Decode UBJSON (draft 12, with typed and counted containers, as XGBoost writes it).
    Typed numeric arrays come back as numpy arrays (one read, not one object per value)."""
    view = memoryview(data)
    value, end = _ubj_value(view, 0, None, 0)
    if end != len(data):
        raise ValueError(f"{len(data) - end} bytes after the UBJSON value")
    return value


def _ubj_count(view, at):
    marker = bytes(view[at:at + 1])
    if marker not in (b"i", b"U", b"I", b"l", b"L"):
        raise ValueError(f"a UBJSON length must be an integer, found {marker!r} at {at}")
    dtype = np.dtype(_UBJ_NUMBERS[marker])
    n = int(np.frombuffer(view[at + 1:at + 1 + dtype.itemsize], dtype)[0])
    if n < 0:
        raise ValueError(f"negative UBJSON length at {at}")
    return n, at + 1 + dtype.itemsize


def _ubj_value(view, at, marker, depth):
    if depth > _UBJ_DEPTH:
        raise ValueError("UBJSON nested too deep")
    if marker is None:
        if at >= len(view):
            raise ValueError("UBJSON ends early")
        marker, at = bytes(view[at:at + 1]), at + 1
    if marker in _UBJ_NUMBERS:
        dtype = np.dtype(_UBJ_NUMBERS[marker])
        if at + dtype.itemsize > len(view):
            raise ValueError("UBJSON ends inside a number")
        number = np.frombuffer(view[at:at + dtype.itemsize], dtype)[0]
        return (float(number) if dtype.kind == "f" else int(number)), at + dtype.itemsize
    if marker in (b"Z", b"N"):
        return None, at
    if marker in (b"T", b"F"):
        return marker == b"T", at
    if marker == b"C":
        return bytes(view[at:at + 1]).decode("latin-1"), at + 1
    if marker in (b"S", b"H"):
        n, at = _ubj_count(view, at)
        if at + n > len(view):
            raise ValueError("UBJSON ends inside a string")
        text = bytes(view[at:at + n]).decode("utf-8")
        return (float(text) if marker == b"H" else text), at + n
    if marker in (b"[", b"{"):
        return _ubj_container(view, at, marker == b"{", depth)
    raise ValueError(f"unknown UBJSON marker {marker!r} at {at - 1}")


def _ubj_container(view, at, is_object, depth):
    typed = count = None
    if bytes(view[at:at + 1]) == b"$":
        typed, at = bytes(view[at + 1:at + 2]), at + 2
    if bytes(view[at:at + 1]) == b"#":
        count, at = _ubj_count(view, at + 1)
    elif typed is not None:
        raise ValueError("a typed UBJSON container needs a count")
    if not is_object and typed in _UBJ_NUMBERS and count is not None:  # a typed numeric array, in one read
        dtype = np.dtype(_UBJ_NUMBERS[typed])
        size = count * dtype.itemsize
        if at + size > len(view):
            raise ValueError("UBJSON ends inside an array")
        return np.frombuffer(view[at:at + size], dtype).astype(dtype.newbyteorder("=")), at + size
    out = {} if is_object else []
    k = 0
    while True:
        if count is None:
            if at >= len(view):
                raise ValueError("UBJSON container not closed")
            if bytes(view[at:at + 1]) == (b"}" if is_object else b"]"):
                return out, at + 1
        elif k == count:
            return out, at
        if is_object:
            n, at = _ubj_count(view, at)
            key = bytes(view[at:at + n]).decode("utf-8")
            at += n
            out[key], at = _ubj_value(view, at, typed, depth + 1)
        else:
            item, at = _ubj_value(view, at, typed, depth + 1)
            out.append(item)
        k += 1
