"""scikit-learn's tree models as a TreeEnsemble: the arrays their fitted trees already are.

What is explained is each model's raw output, as scikit-learn computes it:
- gradient boosting (`GradientBoosting*`, `HistGradientBoosting*`): the
  decision function (regression value, or a classifier's margin per class;
  one margin for two classes);
- forests and single trees (`RandomForest*`, `ExtraTrees*`, `DecisionTree*`):
  `predict` for a regressor, `predict_proba` per class for a classifier (the
  mean of the trees' leaf class fractions), so a classifier always has one
  output per class.

How a row goes down: `DecisionTree`-based models round it to float32 and go
left when `x <= threshold`; HistGradientBoosting compares float64 with
`x <= num_threshold`; a missing value (NaN) goes the node's
`missing_go_to_left` way in both (the side with more samples where training
saw none). Refused with the reason: multi-output models (one prediction per
inference here), HistGradientBoosting's categorical splits, and a Pipeline
(its steps transform the row before the trees see it).
"""

from __future__ import annotations

import numpy as np

from enricher.errors import EnricherError

from .treeshap import DEFAULT_LEFT, TreeEnsemble

GRADIENT_BOOSTING = ("GradientBoostingRegressor", "GradientBoostingClassifier")
HIST_GRADIENT_BOOSTING = ("HistGradientBoostingRegressor", "HistGradientBoostingClassifier")
FORESTS = ("RandomForestRegressor", "RandomForestClassifier", "ExtraTreesRegressor", "ExtraTreesClassifier")
SINGLE = ("DecisionTreeRegressor", "DecisionTreeClassifier", "ExtraTreeRegressor", "ExtraTreeClassifier")
SUPPORTED = GRADIENT_BOOSTING + HIST_GRADIENT_BOOSTING + FORESTS + SINGLE


class UnsupportedModel(EnricherError, TypeError):
    """A scikit-learn model we do not read; the message says why."""


def is_classifier(model) -> bool:
    return hasattr(model, "classes_")


def raw_output(model, X: np.ndarray) -> np.ndarray:
    """What the ensemble of `model` reproduces, (rows, outputs): scikit-learn's own numbers."""
    name = type(model).__name__
    if name in GRADIENT_BOOSTING + HIST_GRADIENT_BOOSTING:
        raw = model.decision_function(X) if is_classifier(model) else model.predict(X)
    else:
        raw = model.predict_proba(X) if is_classifier(model) else model.predict(X)
    return np.asarray(raw, np.float64).reshape(len(X), -1)


def ensemble(model, n_features: int | None = None) -> TreeEnsemble:
    name = type(model).__name__
    if name == "Pipeline":
        raise UnsupportedModel("a scikit-learn Pipeline: its steps change the row before the trees see it, so "
                               "the trees' attributions are not the schema features'; register its last step "
                               "(fitted on the features as the schema sends them) instead")
    if name not in SUPPORTED:
        raise UnsupportedModel(f"cannot read {name}: one of {', '.join(SUPPORTED)} is expected")
    if getattr(model, "n_outputs_", 1) > 1:
        raise UnsupportedModel(f"the {name} predicts {model.n_outputs_} outputs (multi-output); an inference here "
                               "has one prediction: fit one model per output")
    n_features = n_features or model.n_features_in_
    if name in HIST_GRADIENT_BOOSTING:
        return _hist(model, n_features)
    if name in GRADIENT_BOOSTING:
        estimators = model.estimators_  # (n_estimators, K): one regression tree per round and class
        trees = [(estimators[i, k].tree_, k, model.learning_rate, None)
                 for i in range(estimators.shape[0]) for k in range(estimators.shape[1])]
        outputs = estimators.shape[1]
    else:
        members = model.estimators_ if name in FORESTS else [model]
        share = 1.0 / len(members)
        classes = len(model.classes_) if is_classifier(model) else 0
        # a classifier's tree adds its leaf's class fractions to every class: one copy per class
        trees = [(m.tree_, k, share, k if classes else None) for m in members for k in range(max(1, classes))]
        outputs = max(1, classes)
    parts = {k: [] for k in ("left", "right", "feature", "threshold", "value", "cover", "decision")}
    node_start, tree_output, offset = [0], [], 0
    for tree, output, scale, cls in trees:
        leaf = tree.children_left < 0
        if cls is None:
            value = tree.value[:, 0, 0]
        else:  # the fractions predict_proba divides out (stored as fractions or counts by version)
            totals = tree.value[:, 0, :].sum(axis=1)
            value = tree.value[:, 0, cls] / np.where(totals > 0, totals, 1.0)
        parts["left"].append(np.where(leaf, -1, tree.children_left + offset))
        parts["right"].append(np.where(leaf, -1, tree.children_right + offset))
        parts["feature"].append(np.where(leaf, 0, tree.feature))
        parts["threshold"].append(np.where(leaf, 0.0, tree.threshold))
        parts["value"].append(np.where(leaf, value * scale, 0.0))
        parts["cover"].append(tree.weighted_n_node_samples)
        parts["decision"].append(np.where(tree.missing_go_to_left.astype(bool) & ~leaf, DEFAULT_LEFT, 0))
        offset += tree.node_count
        node_start.append(offset)
        tree_output.append(output)
    return _with_init(model, {k: np.concatenate(v) for k, v in parts.items()}, node_start, tree_output, outputs,
                      n_features, precision=32)


def _hist(model, n_features: int) -> TreeEnsemble:
    parts = {k: [] for k in ("left", "right", "feature", "threshold", "value", "cover", "decision")}
    node_start, tree_output, offset = [0], [], 0
    for round_ in model._predictors:
        for k, predictor in enumerate(round_):
            nodes = predictor.nodes
            leaf = nodes["is_leaf"].astype(bool)
            if np.any(nodes["is_categorical"][~leaf]):
                raise UnsupportedModel("the HistGradientBoosting model has categorical splits "
                                       "(categorical_features); we explain its numerical splits only")
            parts["left"].append(np.where(leaf, -1, nodes["left"].astype(np.int64) + offset))
            parts["right"].append(np.where(leaf, -1, nodes["right"].astype(np.int64) + offset))
            parts["feature"].append(np.where(leaf, 0, nodes["feature_idx"]))
            parts["threshold"].append(np.where(leaf, 0.0, nodes["num_threshold"]))
            parts["value"].append(np.where(leaf, nodes["value"], 0.0))
            parts["cover"].append(nodes["count"].astype(np.float64))
            parts["decision"].append(np.where(nodes["missing_go_to_left"].astype(bool) & ~leaf, DEFAULT_LEFT, 0))
            offset += len(nodes)
            node_start.append(offset)
            tree_output.append(k)
    outputs = len(model._predictors[0]) if model._predictors else 1
    return _with_init(model, {k: np.concatenate(v) for k, v in parts.items()}, node_start, tree_output, outputs,
                      n_features, precision=64)


def _with_init(model, arrays: dict, node_start, tree_output, outputs: int, n_features: int,
               precision: int) -> TreeEnsemble:
    """The constant term: scikit-learn's own output on one row, less the trees' (the init
    estimator's or baseline prediction, whichever kind the model has)."""
    how = dict(node_start=node_start, tree_output=tree_output, n_features=n_features, precision=precision)
    partial = TreeEnsemble(**arrays, **how, init=np.zeros(outputs), tables={})
    partial.check_structure()
    probe = np.zeros((1, n_features))
    init = raw_output(model, probe)[0] - partial.predict_raw(probe)[0]
    return TreeEnsemble(**arrays, **how, init=init)
