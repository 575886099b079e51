"""Exact path-dependent TreeSHAP for tree ensembles, precomputed per leaf, compiled per batch.

The attributions are those of Lundberg et al.'s path-dependent TreeSHAP
(`shap.TreeExplainer(model, feature_perturbation="tree_path_dependent")`), the
same numbers, computed another way (the road FastTreeSHAP v2 opened, Yang 2021):

For a leaf `l` with value `v`, let `U` be the distinct features split on along
its path (`m = |U|`); for `j` in `U`, `z_j` is the product of the cover ratios
(child / parent) of the path's splits on `j`, and `o_j(x)` is 1 when `x`
satisfies every split on `j` along the path, else 0. Path-dependent TreeSHAP's
game is, per leaf, `v_l(S) = v * prod_{j in S} o_j * prod_{j in U \\ S} z_j`,
summed over leaves; a leaf's game involves only its path's features, so the
Shapley value of feature `i` (in `U`) from leaf `l` is

    phi_i = v (o_i - z_i) sum_{S in M \\ {i}} w(|S|, m) prod_{j in U \\ S \\ {i}} z_j,

with `M` the set of `U`'s features that `x` satisfies and `w(s, m) = s! (m-s-1)! / m!`.
It depends on `x` only through `M`, one of `2^m` masks. So at fit (or load)
time every leaf gets a table `T[l, k, M]` (k: position of the feature in `U`),
and explaining a row is, per tree: compare the row with every split once,
build each leaf's mask from its path's comparisons, and add `m` table entries
per leaf (stored side by side: one cache line). No polynomial unwinding per row; the per-row work is a few hundred
integer operations per tree, compiled with numba (`nogil`: the stream's other
threads run meanwhile), for a whole batch per call.

The tables cost `m * 2^m` floats per leaf: nothing for the surrogates we fit
(depth <= 6), a limit for deep user models (`MAX_PATH_FEATURES`; such a
model is refused with the reason).

Serving never unpickles: the ensemble and its tables are flat numpy arrays
(`np.savez`, read back with `allow_pickle=False`).
"""

from __future__ import annotations

import io
import math

import numba
import numpy as np

MAX_PATH_FEATURES = 16      # distinct features on one root-leaf path
MAX_TABLE_ENTRIES = 50_000_000  # 400 MB of float64 tables per ensemble


class TreeEnsemble:
    """A sum of regression trees per output, flat, with its TreeSHAP tables.

    Per node (all trees concatenated, each tree's root first): `left`, `right`
    (global node indices, -1 at a leaf), `feature`, `threshold` (float64; a row
    goes left when `x <= threshold`, or `x < threshold` if `strict`), `value`
    (a leaf's contribution to the output, scaled), `cover` (training weight
    through the node). Per tree: `node_start`, `tree_output` (which output it
    adds to). `init[k]`: output k's constant term. Outputs are raw: the
    regression value, or the margin (log-odds) of a classifier.
    """

    def __init__(self, left, right, feature, threshold, value, cover, node_start, tree_output, init,
                 n_features: int, strict: bool = False, tables: dict | None = None):
        self.left = np.ascontiguousarray(left, np.int32)
        self.right = np.ascontiguousarray(right, np.int32)
        self.feature = np.ascontiguousarray(feature, np.int32)
        self.threshold = np.ascontiguousarray(threshold, np.float64)
        self.value = np.ascontiguousarray(value, np.float64)
        self.cover = np.ascontiguousarray(cover, np.float64)
        self.node_start = np.ascontiguousarray(node_start, np.int64)
        self.tree_output = np.ascontiguousarray(tree_output, np.int32)
        self.init = np.ascontiguousarray(init, np.float64)
        self.n_features = int(n_features)
        self.strict = bool(strict)
        self.tables = tables if tables is not None else _precompute(self)
        if self.tables:
            self._work()

    def _work(self) -> None:
        """The nodes a row visits per tree, in preorder: every split, and the leaves no
        twig holds (a twig's leaves are done at the twig). Derived, never stored."""
        keep = (self.left >= 0) | (self.tables["node_unit"] >= 0)
        self.work = np.flatnonzero(keep).astype(np.int32)
        self.work_start = np.searchsorted(self.work, self.node_start).astype(np.int64)

    # -- shape -----------------------------------------------------------------
    @property
    def n_trees(self) -> int:
        return len(self.node_start) - 1

    @property
    def n_outputs(self) -> int:
        return len(self.init)

    @property
    def base(self) -> np.ndarray:
        """Each output's expected value over the training cover: what attributions start from."""
        return self.tables["base"]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays().values())

    # -- builders ----------------------------------------------------------------
    @classmethod
    def from_sklearn(cls, model, n_features: int | None = None) -> "TreeEnsemble":
        """A fitted scikit-learn GradientBoostingRegressor or GradientBoostingClassifier."""
        from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor

        if not isinstance(model, (GradientBoostingRegressor, GradientBoostingClassifier)):
            raise TypeError(f"cannot read {type(model).__name__}: a gradient-boosting ensemble is expected")
        n_features = n_features or model.n_features_in_
        estimators = model.estimators_  # (n_estimators, K)
        K = estimators.shape[1]
        parts = {k: [] for k in ("left", "right", "feature", "threshold", "value", "cover")}
        node_start, tree_output, offset = [0], [], 0
        for i in range(estimators.shape[0]):
            for k in range(K):
                tree = estimators[i, k].tree_
                leaf = tree.children_left < 0
                parts["left"].append(np.where(leaf, -1, tree.children_left + offset))
                parts["right"].append(np.where(leaf, -1, tree.children_right + offset))
                parts["feature"].append(np.where(leaf, 0, tree.feature))
                parts["threshold"].append(np.where(leaf, 0.0, tree.threshold))
                parts["value"].append(np.where(leaf, tree.value[:, 0, 0] * model.learning_rate, 0.0))
                parts["cover"].append(tree.weighted_n_node_samples)
                offset += tree.node_count
                node_start.append(offset)
                tree_output.append(k)
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        probe = np.zeros((1, n_features), np.float32)
        raw = (model.decision_function(probe) if isinstance(model, GradientBoostingClassifier)
               else model.predict(probe)).reshape(1, -1)[0]
        partial = cls(**arrays, node_start=node_start, tree_output=tree_output, init=np.zeros(K),
                      n_features=n_features, tables={})
        init = raw - partial.predict_raw(probe)[0]
        return cls(**arrays, node_start=node_start, tree_output=tree_output, init=init, n_features=n_features)

    # -- use -----------------------------------------------------------------------
    def predict_raw(self, X: np.ndarray) -> np.ndarray:
        """Raw outputs, (rows, outputs)."""
        X = _matrix(X, self.n_features)
        out = np.zeros((X.shape[0], self.n_outputs))
        _predict(X, self.left, self.right, self.feature, self.threshold, self.value, self.node_start,
                 self.tree_output, self.strict, out)
        return out + self.init

    def explain(self, X: np.ndarray, output: np.ndarray | int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(attributions (rows, features), base value (rows,), explained output (rows,)) for the
        output chosen per row (`output`: an int for all rows, or one per row). Attributions plus
        base value equal the output (additivity), which is computed by walking the trees."""
        X = _matrix(X, self.n_features)
        n = X.shape[0]
        rows_output = np.full(n, output, np.int32) if np.isscalar(output) else np.ascontiguousarray(output, np.int32)
        if rows_output.shape != (n,) or (n and (rows_output.min() < 0 or rows_output.max() >= self.n_outputs)):
            raise ValueError(f"output: one of 0..{self.n_outputs - 1} per row")
        phi = np.zeros((n, self.n_features))
        value = np.zeros(n)
        t = self.tables
        _explain(X, self.left, self.right, self.feature, self.threshold, self.value, self.node_start,
                 self.tree_output, self.strict, self.work, self.work_start, t["node_pos"], t["node_unit"],
                 t["unit_m"], t["unit_fs"], t["unit_feat"], t["unit_tab"], t["table"], rows_output, phi, value)
        return phi, t["base"][rows_output], value + self.init[rows_output]

    # -- bytes -------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        own = {k: getattr(self, k) for k in ("left", "right", "feature", "threshold", "value", "cover",
                                             "node_start", "tree_output", "init")}
        return {**own, **{f"t_{k}": v for k, v in self.tables.items()},
                "meta": np.array([self.n_features, int(self.strict)], np.int64)}

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self._arrays())
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "TreeEnsemble":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        n_features, strict = (int(v) for v in arrays.pop("meta"))
        tables = {k[2:]: arrays.pop(k) for k in list(arrays) if k.startswith("t_")}
        ensemble = cls(**arrays, n_features=n_features, strict=bool(strict), tables={})
        ensemble.tables = tables
        ensemble.check()  # before anything indexes with them
        ensemble._work()
        return ensemble

    def check_structure(self) -> None:
        """The trees as trees: every child after its parent and inside its tree, every
        feature one the rows have (what the precomputation and the loops rely on)."""
        nodes = len(self.left)
        idx = np.arange(nodes)
        inner = self.left >= 0
        ok = (len(self.right) == len(self.feature) == len(self.threshold) == len(self.value) == len(self.cover)
              == nodes and len(self.node_start) >= 1 and self.node_start[0] == 0
              and self.node_start[-1] == nodes and bool(np.all(np.diff(self.node_start) > 0))
              and len(self.tree_output) == self.n_trees
              and bool(np.all((self.tree_output >= 0) & (self.tree_output < self.n_outputs)))
              and bool(np.all((self.left == -1) == (self.right == -1))))
        if ok and nodes:
            ends = np.repeat(self.node_start[1:], np.diff(self.node_start))
            ok = (bool(np.all((self.left[inner] > idx[inner]) & (self.left[inner] < ends[inner])
                              & (self.right[inner] > idx[inner]) & (self.right[inner] < ends[inner])))
                  and bool(np.all((self.feature[inner] >= 0) & (self.feature[inner] < self.n_features)))
                  and bool(np.all(np.isfinite(self.value)) and np.all(np.isfinite(self.cover))
                           and np.all(self.cover >= 0)))
        if not ok:
            raise ValueError("tree ensemble arrays are inconsistent")

    def check(self) -> None:
        """Structural checks on arrays read from bytes: every index inside the array it
        indexes, so that the compiled loops (which do not check bounds) never leave them."""
        self.check_structure()
        nodes, t = len(self.left), self.tables
        inner = self.left >= 0
        units = len(t["unit_m"])
        m = t["unit_m"].astype(np.int64)
        ok = (len(t["node_pos"]) == len(t["node_unit"]) == nodes
              and bool(np.all((self.feature >= 0) & (self.feature < self.n_features)))
              and bool(np.all((m >= 0) & (m <= MAX_PATH_FEATURES)))
              and bool(np.all((t["node_pos"] >= 0) & (t["node_pos"] < MAX_PATH_FEATURES)))
              and bool(np.all((t["node_unit"] >= -1) & (t["node_unit"] < units)))
              and len(t["unit_fs"]) == len(t["unit_tab"]) == units + 1
              and t["unit_fs"][0] == 0 and bool(np.all(np.diff(t["unit_fs"]) == m))
              and len(t["unit_feat"]) == t["unit_fs"][-1] and len(t["table"]) == t["unit_tab"][-1]
              and bool(np.all((t["unit_feat"] >= 0) & (t["unit_feat"] < self.n_features)))
              and len(t["base"]) == self.n_outputs and t["unit_tab"][0] == 0)
        if ok:  # each unit's table as long as its node's kind says (a twig: both sides)
            carriers = np.flatnonzero(t["node_unit"] >= 0)
            unit = t["node_unit"][carriers]
            twig = inner[carriers]
            size = np.zeros(units, np.int64)
            size[unit] = (m[unit] << m[unit]) * np.where(twig, 2, 1)
            ok = len(np.unique(unit)) == units and bool(np.all(np.diff(t["unit_tab"]) == size))
        if not ok:
            raise ValueError("tree ensemble arrays are inconsistent")


def _matrix(X, n_features: int) -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32) if not (isinstance(X, np.ndarray) and X.dtype == np.float32
                                                        and X.flags.c_contiguous) else X
    if X.ndim != 2 or X.shape[1] != n_features:
        raise ValueError(f"expected a (rows, {n_features}) matrix, got {X.shape}")
    return X


# -- precomputation ------------------------------------------------------------

def _precompute(ens: TreeEnsemble) -> dict[str, np.ndarray]:
    """The tables, by *unit*: a split whose two children are leaves (a twig, the
    commonest end of a tree) or a leaf whose sibling is not one.

    Per unit: `unit_m` distinct path features, `unit_feat` (which), a table of
    `m * 2^m` entries per leaf; a twig's table holds, for each side the row
    takes, the sum of its two leaves' entries, so a row adds `m` entries per
    twig instead of `2m`. Per split: `node_pos`, the position of its feature
    among the distinct features of the path down to it. `node_unit`: the unit a
    node carries (-1: none; a twig's leaves carry none).
    """
    nodes = len(ens.left)
    left, right, feature, cover, value = ens.left, ens.right, ens.feature, ens.cover, ens.value
    node_pos = np.zeros(nodes, np.int32)
    path_features: dict[int, tuple] = {}
    path_z: dict[int, tuple] = {}
    leaves = []
    base = ens.init.astype(np.float64).copy()
    entries = 0
    for t in range(ens.n_trees):
        stack = [(int(ens.node_start[t]), (), ())]  # (node, distinct features above, their cover ratios)
        while stack:
            node, features, z = stack.pop()
            if left[node] >= 0:
                f = int(feature[node])
                k = features.index(f) if f in features else len(features)
                node_pos[node] = k
                below = features if k < len(features) else features + (f,)
                # A child's share of the split's cover, out of both children's (equal to
                # child / node where the file's covers add up, as every library's do; and
                # the shares add up to 1 even where they do not, so additivity holds).
                both = cover[left[node]] + cover[right[node]]
                for child in (int(right[node]), int(left[node])):
                    ratio = cover[child] / both if both > 0 else 0.5
                    zc = list(z) + ([1.0] if k == len(z) else [])
                    zc[k] *= ratio
                    stack.append((child, below, tuple(zc)))
                continue
            m = len(features)
            if m > MAX_PATH_FEATURES:
                raise ValueError(f"a tree path splits on {m} distinct features; exact TreeSHAP tables are "
                                 f"kept for at most {MAX_PATH_FEATURES}")
            entries += m << m
            if entries > MAX_TABLE_ENTRIES:
                raise ValueError(f"the ensemble's TreeSHAP tables would exceed {MAX_TABLE_ENTRIES:,} entries "
                                 "(trees too deep or too many); use shallower trees")
            base[ens.tree_output[t]] += value[node] * math.prod(z)
            path_features[node], path_z[node] = features, z
            leaves.append(node)
    # every leaf's own table
    leaf_index = {node: i for i, node in enumerate(leaves)}
    leaf_m = np.array([len(path_features[n]) for n in leaves], np.int32)
    leaf_tab = np.zeros(len(leaves) + 1, np.int64)
    np.cumsum(leaf_m.astype(np.int64) << leaf_m, out=leaf_tab[1:])
    leaf_fs = np.zeros(len(leaves) + 1, np.int64)
    np.cumsum(leaf_m, out=leaf_fs[1:])
    leaf_tables = np.zeros(leaf_tab[-1], np.float64)
    z_flat = np.array([v for n in leaves for v in path_z[n]], np.float64)
    _fill_tables(leaf_m, leaf_fs, z_flat, np.array([value[n] for n in leaves], np.float64), leaf_tab, leaf_tables)

    def leaf_table(node):
        i = leaf_index[node]
        m = int(leaf_m[i])
        return leaf_tables[leaf_tab[i]:leaf_tab[i + 1]].reshape(1 << m, m)  # [mask][k]

    # units: twigs, then the leaves no twig holds
    node_unit = np.full(nodes, -1, np.int32)
    unit_m, unit_feat, tables = [], [], []
    held = set()
    for node in range(nodes):
        if left[node] >= 0 and left[left[node]] < 0 and left[right[node]] < 0:
            a, b = int(left[node]), int(right[node])
            m = len(path_features[a])
            masks = np.arange(1 << m)
            cleared = masks & ~(1 << int(node_pos[node]))
            ta, tb = leaf_table(a), leaf_table(b)
            tables.append(np.concatenate([(ta[masks] + tb[cleared]).ravel(),    # the row went left
                                          (ta[cleared] + tb[masks]).ravel()]))  # the row went right
            node_unit[node] = len(unit_m)
            unit_m.append(m)
            unit_feat.extend(path_features[a])
            held.update((a, b))
    for node in leaves:
        if node not in held:
            node_unit[node] = len(unit_m)
            unit_m.append(len(path_features[node]))
            unit_feat.extend(path_features[node])
            tables.append(leaf_table(node).ravel())
    unit_m_a = np.array(unit_m, np.int32)
    unit_fs = np.zeros(len(unit_m) + 1, np.int64)
    np.cumsum(unit_m_a, out=unit_fs[1:])
    unit_tab = np.zeros(len(unit_m) + 1, np.int64)
    np.cumsum([len(x) for x in tables], out=unit_tab[1:])
    return {"node_pos": node_pos, "node_unit": node_unit, "unit_m": unit_m_a, "unit_fs": unit_fs,
            "unit_feat": np.array(unit_feat, np.int32), "unit_tab": unit_tab,
            "table": np.concatenate(tables) if tables else np.zeros(0), "base": base}


@numba.njit(cache=True, nogil=True)
def _fill_tables(leaf_m, feat_start, z_flat, values, tab_start, table):
    coef = np.zeros(MAX_PATH_FEATURES + 1)
    for leaf in range(len(leaf_m)):
        m = leaf_m[leaf]
        z = z_flat[feat_start[leaf]:feat_start[leaf] + m]
        v = values[leaf]
        # w(s, m) = s! (m - s - 1)! / m!
        w = np.zeros(max(m, 1))
        for s in range(m):
            w[s] = math.exp(math.lgamma(s + 1) + math.lgamma(m - s) - math.lgamma(m + 1))
        for mask in range(1 << m):
            for k in range(m):
                # coefficients of prod_{j in mask, j != k} (z_j + t); the rest contribute z_j
                coef[:] = 0.0
                coef[0] = 1.0
                size = 0
                others = 1.0
                for j in range(m):
                    if j == k:
                        continue
                    if (mask >> j) & 1:
                        for s in range(size + 1, 0, -1):
                            coef[s] = coef[s] * z[j] + coef[s - 1]
                        coef[0] *= z[j]
                        size += 1
                    else:
                        others *= z[j]
                total = 0.0
                for s in range(size + 1):
                    total += w[s] * coef[s]
                o = 1.0 if (mask >> k) & 1 else 0.0
                table[tab_start[leaf] + mask * m + k] = v * (o - z[k]) * others * total


_BLOCK = 64


@numba.njit(cache=True, nogil=True)
def _goes_left(x, threshold, strict):
    return x < threshold if strict else x <= threshold


@numba.njit(cache=True, nogil=True)
def _predict(X, left, right, feature, threshold, value, node_start, tree_output, strict, out):
    for i in range(X.shape[0]):
        for t in range(len(node_start) - 1):
            node = node_start[t]
            while left[node] >= 0:
                node = left[node] if _goes_left(X[i, feature[node]], threshold[node], strict) else right[node]
            out[i, tree_output[t]] += value[node]


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _explain(X, left, right, feature, threshold, value, node_start, tree_output, strict, work, work_start,
             node_pos, node_unit, unit_m, unit_fs, unit_feat, unit_tab, table, rows_output, phi, out):
    # Trees outermost within a block of rows: a tree's tables stay in cache for the block.
    # Nodes are in preorder (children after their parent), so one pass per row and tree
    # pushes each leaf's mask down: a split clears its feature's bit on the side the row
    # did not take. A twig adds its merged entries for the side taken; its leaves are
    # not visited (`work` leaves them out).
    widest = 1
    for t in range(len(node_start) - 1):
        widest = max(widest, node_start[t + 1] - node_start[t])
    masks = np.zeros(widest, np.int64)
    n = X.shape[0]
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        for t in range(len(node_start) - 1):
            first, target = node_start[t], tree_output[t]
            for i in range(start, stop):
                if rows_output[i] != target:
                    continue
                masks[0] = -1
                at = first  # the row's own path, for its output
                for w in range(work_start[t], work_start[t + 1]):
                    node = work[w]
                    unit = node_unit[node]
                    here = masks[node - first]
                    if left[node] < 0:  # a leaf no twig holds
                        m = unit_m[unit]
                        row = unit_tab[unit] + (here & ((np.int64(1) << m) - 1)) * m
                        f0 = unit_fs[unit]
                        for k in range(m):
                            phi[i, unit_feat[f0 + k]] += table[row + k]
                        if at == node:
                            out[i] += value[node]
                        continue
                    goes_left = _goes_left(X[i, feature[node]], threshold[node], strict)
                    if unit >= 0:  # a twig: both its leaves at once
                        m = unit_m[unit]
                        row = unit_tab[unit] + (0 if goes_left else (m << m)) + (here & ((np.int64(1) << m) - 1)) * m
                        f0 = unit_fs[unit]
                        for k in range(m):
                            phi[i, unit_feat[f0 + k]] += table[row + k]
                        if at == node:
                            out[i] += value[left[node]] if goes_left else value[right[node]]
                        continue
                    bit = np.int64(1) << node_pos[node]
                    masks[left[node] - first] = here if goes_left else here & ~bit
                    masks[right[node] - first] = here & ~bit if goes_left else here
                    if at == node:
                        at = left[node] if goes_left else right[node]
