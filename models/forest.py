"""A fitted Isolation Forest flattened into a few numpy arrays, scored for all
trees at once.

scikit-learn fits the forest; serving does not use it. scikit-learn's
`score_samples` walks the trees one by one through Python and joblib, which
costs ~15 ms per call even for a handful of rows: fine for one model and big
batches, ruinous for a stream spread over a thousand models. Here every node
of every tree lives in flat arrays, and one batch walks all its trees
together, level by level, with vectorised gathers: the per-call cost is a few
dozen numpy operations whatever the number of trees.

The arrays are also the artifact format (`np.savez`, read back with
`allow_pickle=False`): serving never unpickles anything.

Exactness: scikit-learn compares float32 inputs with float64 thresholds. A
threshold is stored as the largest float32 not above it, for which
`x <= t32` holds exactly when `x <= t64` does for every float32 `x`; leaf path
lengths are summed in float64. Scores match scikit-learn's to ~1e-7.
"""

from __future__ import annotations

import io

import numpy as np

_LEAF = -1  # scikit-learn's TREE_LEAF
_CHUNK = 2048


class CompactForest:
    __slots__ = ("feature", "threshold", "children", "value", "roots", "depth", "denominator", "n_features")

    def __init__(self, feature, threshold, children, value, roots, depth: int, denominator: float, n_features: int):
        self.feature = feature          # int32[nodes]   feature tested (0 at leaves)
        self.threshold = threshold      # float32[nodes] go left if x <= threshold (+inf at leaves)
        self.children = children        # int32[nodes, 2] (left, right); a leaf points at itself
        self.value = value              # float32[nodes] path length credited at a leaf
        self.roots = roots              # int32[trees]
        self.depth = int(depth)         # levels to walk
        self.denominator = float(denominator)  # trees * c(max_samples)
        self.n_features = int(n_features)

    @classmethod
    def from_sklearn(cls, forest) -> "CompactForest":
        from sklearn.ensemble._iforest import _average_path_length

        n_features = forest.n_features_in_
        subsample = forest._max_features != n_features
        parts = {k: [] for k in ("feature", "threshold", "children", "value")}
        roots, offset, depth = [], 0, 0
        for i, (est, features) in enumerate(zip(forest.estimators_, forest.estimators_features_)):
            tree = est.tree_
            left, right = tree.children_left, tree.children_right
            leaf = left == _LEAF
            local = np.arange(tree.node_count)
            feature = tree.feature.copy()
            if subsample:  # the tree was fitted on a subset of columns: map back to ours
                feature = np.where(leaf, 0, np.asarray(features)[np.where(leaf, 0, feature)])
            feature = np.where(leaf, 0, feature).astype(np.int32)
            threshold = _float32_floor(tree.threshold)
            threshold[leaf] = np.inf
            children = np.stack([np.where(leaf, local, left), np.where(leaf, local, right)], axis=1) + offset
            node_depth = tree.compute_node_depths()
            value = np.where(leaf, node_depth + _average_path_length(tree.n_node_samples) - 1.0, 0.0)
            parts["feature"].append(feature)
            parts["threshold"].append(threshold)
            parts["children"].append(children.astype(np.int32))
            parts["value"].append(value.astype(np.float32))
            roots.append(offset)
            offset += tree.node_count
            depth = max(depth, int(node_depth.max()))
        denominator = len(forest.estimators_) * float(_average_path_length([forest._max_samples])[0])
        return cls(*(np.concatenate(parts[k]) for k in ("feature", "threshold", "children", "value")),
                   np.asarray(roots, np.int32), depth, denominator, n_features)

    def path_lengths(self, X: np.ndarray) -> np.ndarray:
        """Summed path length of each row over all trees."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if len(X) <= _CHUNK:
            return self._walk(X)
        # chunks keep the (rows x trees) index arrays in cache
        return np.concatenate([self._walk(X[i:i + _CHUNK]) for i in range(0, len(X), _CHUNK)])

    def _walk(self, X: np.ndarray) -> np.ndarray:
        n, d = X.shape
        node = np.broadcast_to(self.roots, (n, len(self.roots))).astype(np.int32)
        base = (np.arange(n, dtype=np.int32) * d)[:, None]
        flat_x = X.ravel()
        flat_children = self.children.ravel()
        for _ in range(self.depth):
            right = flat_x[base + self.feature[node]] > self.threshold[node]
            node = flat_children[2 * node + right]
        return self.value[node].sum(axis=1, dtype=np.float64)

    def score(self, X: np.ndarray) -> np.ndarray:
        """Anomaly score of each row, s = 2^(-E[h(x)]/c(n)), in (0, 1)."""
        if X.shape[1] != self.n_features:
            raise ValueError(f"forest expects {self.n_features} features, got {X.shape[1]}")
        if self.denominator == 0:
            return np.ones(len(X))
        return np.exp2(-self.path_lengths(X) / self.denominator)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, feature=self.feature, threshold=self.threshold, children=self.children, value=self.value,
                 roots=self.roots, meta=np.array([self.depth, self.denominator, self.n_features], np.float64))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "CompactForest":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            depth, denominator, n_features = z["meta"]
            forest = cls(z["feature"], z["threshold"], z["children"], z["value"], z["roots"],
                         int(depth), float(denominator), int(n_features))
        forest.check()
        return forest

    def check(self) -> None:
        """Refuse arrays that would index out of bounds (a corrupt artifact)."""
        nodes = len(self.feature)
        if not (len(self.threshold) == len(self.value) == len(self.children) == nodes):
            raise ValueError("forest arrays differ in length")
        if self.children.shape != (nodes, 2) or nodes == 0:
            raise ValueError("forest children array has the wrong shape")
        if self.children.min() < 0 or self.children.max() >= nodes or self.roots.min() < 0 \
                or self.roots.max() >= nodes:
            raise ValueError("forest node index out of range")
        if self.feature.min() < 0 or self.feature.max() >= self.n_features:
            raise ValueError("forest feature index out of range")


def _float32_floor(values: np.ndarray) -> np.ndarray:
    """The largest float32 not above each float64 value."""
    f32 = values.astype(np.float32)
    above = f32.astype(np.float64) > values
    f32[above] = np.nextafter(f32[above], np.float32(-np.inf))
    return f32

