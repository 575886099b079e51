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
(depth <= 6), too much for deep user models (XGBoost `max_depth=12`,
LightGBM `num_leaves=255`). A tree whose tables would be too large (a path on
more than `TABLE_PATH_FEATURES` distinct features, or past the ensemble's
`MAX_TABLE_ENTRIES`) is explained instead by the classic path-dependent
recursion (Lundberg et al. 2018, Algorithm 2: O(leaves x depth^2) per row),
compiled the same way: the same numbers, per tree, whatever the depth.

How a row goes down a split is the model library's own rule (`decision`, per
node, and the ensemble's `strict` and `precision`): XGBoost rounds the row to
float32 and goes left when `x < threshold`; LightGBM compares doubles with
`x <= threshold`; scikit-learn rounds to float32 and compares with `<=`. A
missing value (NaN) goes the node's default way; LightGBM's `missing_type`
Zero also sends zero (|x| <= 1e-35) the default way, and its `missing_type`
None reads NaN as 0. A categorical split (LightGBM `categorical_feature`,
XGBoost `enable_categorical`) tests the row's category code against the
node's bitset (`cat_offset`, `cat_words` into `cat_bits`): LightGBM sends the
set left and NaN or a negative code right; XGBoost sends the set right, NaN
its default way, and a negative code left.

Serving never unpickles: the ensemble and its tables are flat numpy arrays
(`np.savez`, read back with `allow_pickle=False`).
"""

from __future__ import annotations

import io
import math
import threading

import numba
import numpy as np

MAX_PATH_FEATURES = 16      # distinct features on one root-leaf path a table may index (masks fit)
TABLE_PATH_FEATURES = 10    # a tree with a longer path is explained by the recursion (tables: 80 KB per leaf at 10)
_PARALLEL = threading.Lock()
MAX_TABLE_ENTRIES = 50_000_000  # 400 MB of float64 tables per ensemble; trees past it: the recursion

# `decision` bits, per split: the library's rule for a missing value.
DEFAULT_LEFT = 1  # a missing value goes left (else right)
ZERO_MISSING = 2  # LightGBM missing_type=Zero: zero is missing too
NAN_AS_ZERO = 4   # LightGBM missing_type=None or Zero: NaN is read as 0.0 before the comparison
CATEGORICAL = 8   # a set-membership split: the row's category code in the node's bitset goes left...
CAT_SET_RIGHT = 16  # ...or right (XGBoost); a code outside the set (or invalid) goes the other way
ZERO_EPSILON = float(np.float32(1e-35))  # LightGBM's kZeroThreshold (a float: 1.0000000180025095e-35)


class TreeEnsemble:
    """A sum of regression trees per output, flat, with its TreeSHAP tables.

    Per node (all trees concatenated, each tree's root first): `left`, `right`
    (global node indices, -1 at a leaf), `feature`, `threshold` (float64; a row
    goes left when `x <= threshold`, or `x < threshold` if `strict`), `value`
    (a leaf's contribution to the output, scaled), `cover` (training weight
    through the node), `decision` (bits: where a missing value goes). Per tree:
    `node_start`, `tree_output` (which output it adds to). `init[k]`: output
    k's constant term. Outputs are raw: the regression value, or the margin
    (log-odds) of a classifier. `precision`: 32 when the library rounds a row
    to float32 before comparing it (XGBoost, scikit-learn), 64 when it
    compares doubles (LightGBM). `missing`: a value the library reads as
    missing besides NaN (XGBoost's `missing` parameter), NaN for none.
    `flush_zero`: |x| <= 1e-35 is read as 0.0 (LightGBM's dense rows).
    """

    def __init__(self, left, right, feature, threshold, value, cover, node_start, tree_output, init,
                 n_features: int, strict: bool = False, tables: dict | None = None, decision=None,
                 precision: int = 32, missing: float = float("nan"), flush_zero: bool = False,
                 cat_offset=None, cat_words=None, cat_bits=None):
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
        self.decision = (np.zeros(len(self.left), np.uint8) if decision is None
                         else np.ascontiguousarray(decision, np.uint8))
        nodes = len(self.left)
        self.cat_offset = np.ascontiguousarray(np.zeros(nodes) if cat_offset is None else cat_offset, np.int64)
        self.cat_words = np.ascontiguousarray(np.zeros(nodes) if cat_words is None else cat_words, np.int64)
        self.cat_bits = np.ascontiguousarray(np.zeros(0) if cat_bits is None else cat_bits, np.uint32)
        if precision not in (32, 64):
            raise ValueError(f"precision: 32 or 64, got {precision!r}")
        self.precision = int(precision)
        self.missing = float(missing)
        self.flush_zero = bool(flush_zero)
        self.tables = tables if tables is not None else _precompute(self)
        if self.tables:
            self._work()

    def _work(self) -> None:
        """The nodes a row visits per table tree, in order: every split, and the leaves no
        twig holds (a twig's leaves are done at the twig); the trees the recursion
        explains, and how deep they go. Derived, never stored."""
        by_tables = self.tables["tree_mode"] == 0
        in_table_tree = np.repeat(by_tables, np.diff(self.node_start))
        keep = ((self.left >= 0) | (self.tables["node_unit"] >= 0)) & in_table_tree
        self.work = np.flatnonzero(keep).astype(np.int32)
        self.work_start = np.searchsorted(self.work, self.node_start).astype(np.int64)
        self.path_trees = np.flatnonzero(~by_tables).astype(np.int64)
        self.path_depth = int(_depth(self.left, self.right, self.node_start)) if len(self.path_trees) else 0

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
    def n_path_trees(self) -> int:
        """Trees explained by the recursion (too deep for tables)."""
        return int(np.sum(self.tables["tree_mode"] != 0))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays().values())

    # -- use -----------------------------------------------------------------------
    def predict_raw(self, X: np.ndarray) -> np.ndarray:
        """Raw outputs, (rows, outputs)."""
        X = self.rows(X)
        out = np.zeros((X.shape[0], self.n_outputs))
        _predict(X, self._split(), self.left, self.right, self.feature, self.threshold, self._rule(), self.value,
                 self.node_start, self.tree_output, out)
        return out + self.init

    def _split(self):
        """The compiled split test: without the set test where no split is categorical."""
        return _any_split if len(self.cat_bits) else _numeric_split

    def _rule(self) -> tuple:
        """How a row goes down a split, as the compiled loops take it."""
        return self.decision, self.cat_offset, self.cat_words, self.cat_bits, self.strict

    def rows(self, X) -> np.ndarray:
        """The rows as the model's library reads them (`library_rows`)."""
        return library_rows(X, self.reading)

    @property
    def reading(self) -> tuple[int, int, float, bool]:
        """How the library reads a row: (features, precision, missing, flush_zero)."""
        return self.n_features, self.precision, self.missing, self.flush_zero

    def explain(self, X: np.ndarray, output: np.ndarray | int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(attributions (rows, features), base value (rows,), explained output (rows,)) for the
        output chosen per row (`output`: an int for all rows, or one per row). Attributions plus
        base value equal the output (additivity), which is computed by walking the trees."""
        X = self.rows(X)
        n = X.shape[0]
        rows_output = np.full(n, output, np.int32) if np.isscalar(output) else np.ascontiguousarray(output, np.int32)
        if rows_output.shape != (n,) or (n and (rows_output.min() < 0 or rows_output.max() >= self.n_outputs)):
            raise ValueError(f"output: one of 0..{self.n_outputs - 1} per row")
        phi = np.zeros((n, self.n_features))
        value = np.zeros(n)
        t = self.tables
        rule, split = self._rule(), self._split()
        _explain(X, split, self.left, self.right, self.feature, self.threshold, rule, self.value,
                 self.node_start, self.tree_output, self.work, self.work_start, t["node_pos"],
                 t["node_unit"], t["unit_m"], t["unit_fs"], t["unit_feat"], t["unit_tab"], t["table"], rows_output,
                 phi, value)
        if len(self.path_trees):
            with _PARALLEL:
                _explain_paths(X, split, self.left, self.right, self.feature, self.threshold, rule, self.value,
                               self.cover, self.node_start, self.tree_output, self.path_trees,
                               self.path_depth, rows_output, phi, value)
        return phi, t["base"][rows_output], value + self.init[rows_output]

    # -- bytes -------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        own = {k: getattr(self, k) for k in ("left", "right", "feature", "threshold", "value", "cover",
                                             "decision", "cat_offset", "cat_words", "cat_bits", "node_start",
                                             "tree_output", "init")}
        return {**own, **{f"t_{k}": v for k, v in self.tables.items()},
                "meta": np.array([self.n_features, int(self.strict), self.precision, int(self.flush_zero)], np.int64),
                "missing": np.array([self.missing], np.float64)}

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self._arrays())
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "TreeEnsemble":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        # an artifact from before precision, decision and tree_mode: float32 rows, NaN right, all tables
        n_features, strict, precision, flush_zero = (list(int(v) for v in arrays.pop("meta")) + [32, 0])[:4]
        missing = float(arrays.pop("missing", np.array([np.nan]))[0])
        tables = {k[2:]: arrays.pop(k) for k in list(arrays) if k.startswith("t_")}
        tables.setdefault("tree_mode", np.zeros(len(arrays["node_start"]) - 1, np.int8))
        ensemble = cls(**arrays, n_features=n_features, strict=bool(strict), tables={}, precision=precision,
                       missing=missing, flush_zero=bool(flush_zero))
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
              == len(self.decision) == len(self.cat_offset) == len(self.cat_words) == nodes and len(self.node_start) >= 1 and self.node_start[0] == 0
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
                           and np.all(self.cover >= 0))
                  # a categorical split's bitset inside cat_bits
                  and bool(np.all((self.cat_offset >= 0) & (self.cat_words >= 0)
                                  & (self.cat_offset + self.cat_words <= len(self.cat_bits)))))
        if ok and nodes:
            # Every node but a root is the child of exactly one node: a damaged file can
            # leave orphans (a split turned leaf) or a node with two parents, which the
            # libraries walk happily but which no training ever writes, and which would
            # make the expected value and the attributions disagree with the prediction.
            children = np.concatenate([self.left[inner], self.right[inner]])
            parents = np.bincount(children, minlength=nodes)
            root = np.zeros(nodes, bool)
            root[self.node_start[:-1]] = True
            bad = np.flatnonzero(parents != ~root)
            if len(bad):
                tree = int(np.searchsorted(self.node_start, bad[0], side="right")) - 1
                raise ValueError(f"tree {tree}: node {int(bad[0] - self.node_start[tree])} has "
                                 f"{int(parents[bad[0]])} parents (every node but the root has one)")
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
              and len(t["base"]) == self.n_outputs and t["unit_tab"][0] == 0
              and len(t["tree_mode"]) == self.n_trees and bool(np.all((t["tree_mode"] == 0) | (t["tree_mode"] == 1))))
        if ok:  # a tree the recursion explains carries no table
            in_path_tree = np.repeat(t["tree_mode"] != 0, np.diff(self.node_start))
            ok = bool(np.all(t["node_unit"][in_path_tree] == -1))
        if ok:  # each unit's table as long as its node's kind says (a twig: both sides)
            carriers = np.flatnonzero(t["node_unit"] >= 0)
            unit = t["node_unit"][carriers]
            twig = inner[carriers]
            size = np.zeros(units, np.int64)
            size[unit] = (m[unit] << m[unit]) * np.where(twig, 2, 1)
            ok = len(np.unique(unit)) == units and bool(np.all(np.diff(t["unit_tab"]) == size))
        if not ok:
            raise ValueError("tree ensemble arrays are inconsistent")


def library_rows(X, reading: tuple[int, int, float, bool]) -> np.ndarray:
    """The rows as the model's library reads them (`reading`: TreeEnsemble.reading): float64,
    rounded to float32 first where the library does that, its `missing` value made NaN."""
    n_features, precision, missing, flush_zero = reading
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != n_features:
        raise ValueError(f"expected a (rows, {n_features}) matrix, got {X.shape}")
    if precision == 32:
        narrow = X.astype(np.float32)
        if not math.isnan(missing):  # XGBoost compares with its missing value in float32
            narrow[narrow == np.float32(missing)] = np.nan
        return np.ascontiguousarray(narrow, np.float64)
    X = np.array(X, np.float64, order="C", copy=True)
    if flush_zero:  # LightGBM reads a dense row's |x| <= 1e-35 as an absent value: 0.0
        X[np.abs(X) <= ZERO_EPSILON] = 0.0
    if not math.isnan(missing):
        X[X == missing] = np.nan
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
    # Per tree: tables where they fit, else the recursion (decided before any table is built).
    path_m, weight = _paths(left, right, feature, cover, ens.node_start)
    leaf = left < 0
    tree_of = np.repeat(np.arange(ens.n_trees), np.diff(ens.node_start))
    base = ens.init.astype(np.float64).copy()
    np.add.at(base, ens.tree_output[tree_of[leaf]], value[leaf] * weight[leaf])
    entries_per_tree = np.zeros(ens.n_trees, np.int64)
    widest = np.zeros(ens.n_trees, np.int64)
    np.add.at(entries_per_tree, tree_of[leaf], path_m[leaf].astype(np.int64) << np.minimum(path_m[leaf], 40))
    np.maximum.at(widest, tree_of[leaf], path_m[leaf])
    tree_mode = np.zeros(ens.n_trees, np.int8)
    entries = 0
    for t in range(ens.n_trees):
        if widest[t] > TABLE_PATH_FEATURES or entries + entries_per_tree[t] > MAX_TABLE_ENTRIES:
            tree_mode[t] = 1
        else:
            entries += entries_per_tree[t]
    node_pos = np.zeros(nodes, np.int32)
    path_features: dict[int, tuple] = {}
    path_z: dict[int, tuple] = {}
    leaves = []
    for t in np.flatnonzero(tree_mode == 0):
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
        if left[node] >= 0 and left[left[node]] < 0 and left[right[node]] < 0 and int(left[node]) in leaf_index:
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
            "table": np.concatenate(tables) if tables else np.zeros(0), "base": base, "tree_mode": tree_mode}


@numba.njit(cache=True, nogil=True)
def _paths(left, right, feature, cover, node_start):
    """Per node: the number of distinct features split on above it, and the product
    of the cover shares down to it (a leaf's weight in the tree's expected value).
    Children come after their parent, so one pass in index order does it."""
    nodes = len(left)
    parent = np.full(nodes, -1, np.int64)
    m = np.zeros(nodes, np.int64)
    weight = np.ones(nodes)
    for node in range(nodes):
        if left[node] < 0:
            continue
        new = 1
        up = parent[node]
        while up >= 0:  # is this split's feature already on the path above?
            if feature[up] == feature[node]:
                new = 0
                break
            up = parent[up]
        both = cover[left[node]] + cover[right[node]]
        for child in (left[node], right[node]):
            parent[child] = node
            m[child] = m[node] + new
            weight[child] = weight[node] * (cover[child] / both if both > 0 else 0.5)
    return m, weight


@numba.njit(cache=True, nogil=True)
def _depth(left, right, node_start):
    """The deepest leaf's depth, over all trees (the recursion's stack size)."""
    depth = np.zeros(len(left), np.int64)
    deepest = 0
    for node in range(len(left)):
        if left[node] >= 0:
            depth[left[node]] = depth[node] + 1
            depth[right[node]] = depth[node] + 1
        elif depth[node] > deepest:
            deepest = depth[node]
    return deepest


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


# How a row goes down a split, compiled into the loops: the loops take the test as an
# argument, so an ensemble without categorical splits runs a kernel compiled without
# them (the set test's code in the loop, even never taken, halved the kernel's speed).

@numba.njit(cache=True, nogil=True, inline="always")
def _numeric_split(x, node, threshold, rule):
    decision_, cat_offset, cat_words, cat_bits, strict = rule
    decision = decision_[node]
    if x != x:  # NaN: missing, or 0.0 where LightGBM reads it so
        if decision & NAN_AS_ZERO:
            x = 0.0
        else:
            return (decision & DEFAULT_LEFT) != 0
    if (decision & ZERO_MISSING) and -ZERO_EPSILON <= x <= ZERO_EPSILON:
        return (decision & DEFAULT_LEFT) != 0
    return x < threshold[node] if strict else x <= threshold[node]


@numba.njit(cache=True, nogil=True, inline="always")
def _any_split(x, node, threshold, rule):
    decision_, cat_offset, cat_words, cat_bits, strict = rule
    decision = decision_[node]
    if (decision & CATEGORICAL) == 0:
        return _numeric_split(x, node, threshold, rule)
    if x != x:  # missing: LightGBM's right, XGBoost's default
        return (decision & DEFAULT_LEFT) != 0
    set_right = (decision & CAT_SET_RIGHT) != 0
    # an invalid code: XGBoost sends it left, LightGBM (which truncates first) right
    if x >= 2147483647.0 or (x < 0 if set_right else x <= -1.0):
        return set_right
    code = np.int64(x)
    word = code >> 5
    inside = False
    if word < cat_words[node]:
        inside = ((cat_bits[cat_offset[node] + word] >> np.uint32(code & 31)) & np.uint32(1)) != 0
    return (not inside) if set_right else inside


@numba.njit(cache=True, nogil=True)
def _predict(X, goes_left, left, right, feature, threshold, rule, value, node_start, tree_output, out):
    for i in range(X.shape[0]):
        for t in range(len(node_start) - 1):
            node = node_start[t]
            while left[node] >= 0:
                node = left[node] if goes_left(X[i, feature[node]], node, threshold, rule) else right[node]
            out[i, tree_output[t]] += value[node]


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _explain(X, goes, left, right, feature, threshold, rule, value, node_start, tree_output, work,
             work_start, node_pos, node_unit, unit_m, unit_fs, unit_feat, unit_tab, table, rows_output, phi, out):
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
                    goes_left = goes(X[i, feature[node]], node, threshold, rule)
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


# -- the recursion, for trees too deep for tables ------------------------------------
# (its helpers are inlined: a call passing arrays costs reference counting per node)
# Lundberg et al. 2018, Algorithm 2 (as in shap's tree_shap.h and XGBoost's and
# LightGBM's own pred_contrib), with the recursion unrolled onto an explicit stack: a
# node at depth d keeps its path in segment d of the path arrays, copied from its
# parent's segment d - 1, which stays untouched while the node's subtree is walked.

@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _extend(pf, pz, po, pw, at, depth, zero, one, feat):
    pf[at + depth] = feat
    pz[at + depth] = zero
    po[at + depth] = one
    pw[at + depth] = 1.0 if depth == 0 else 0.0
    for i in range(depth - 1, -1, -1):
        pw[at + i + 1] += one * pw[at + i] * (i + 1) / (depth + 1)
        pw[at + i] = zero * pw[at + i] * (depth - i) / (depth + 1)


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _unwind(pf, pz, po, pw, at, depth, k):
    one, zero = po[at + k], pz[at + k]
    next_one = pw[at + depth]
    for i in range(depth - 1, -1, -1):
        if one != 0:
            tmp = pw[at + i]
            pw[at + i] = next_one * (depth + 1) / ((i + 1) * one)
            next_one = tmp - pw[at + i] * zero * (depth - i) / (depth + 1)
        else:
            pw[at + i] = pw[at + i] * (depth + 1) / (zero * (depth - i))
    for i in range(k, depth):
        pf[at + i] = pf[at + i + 1]
        pz[at + i] = pz[at + i + 1]
        po[at + i] = po[at + i + 1]


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _unwound_sum(pz, po, pw, at, depth, k):
    one, zero = po[at + k], pz[at + k]
    next_one = pw[at + depth]
    total = 0.0
    if one != 0:
        for i in range(depth - 1, -1, -1):
            tmp = next_one / ((i + 1) * one)
            total += tmp
            next_one = pw[at + i] - tmp * zero * (depth - i)
    elif zero != 0:
        for i in range(depth - 1, -1, -1):
            total += pw[at + i] / ((depth - i) * zero)
    return total * (depth + 1)


# Rows in chunks over the cores (each chunk its own path arrays; rows are independent):
# the recursion costs leaves x depth^2 per row and tree, and the libraries use every core
# too. Not cached (numba will not cache a parallel function that passes a function on):
# compiled once per process, at the first deep tree (~10 s). Launched under _PARALLEL:
# numba's default threading layer (workqueue) aborts the process on two launches at once.
@numba.njit(cache=False, nogil=True, parallel=True)
def _explain_paths(X, goes, left, right, feature, threshold, rule, value, cover, node_start, tree_output,
                   trees, max_depth, rows_output, phi, out):
    n = X.shape[0]
    chunks = min(n, 4 * numba.get_num_threads())
    for c in numba.prange(chunks):
        _explain_paths_rows(X, goes, left, right, feature, threshold, rule, value, cover, node_start, tree_output,
                            trees, max_depth, rows_output, phi, out, c * n // chunks, (c + 1) * n // chunks)


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _explain_paths_rows(X, goes, left, right, feature, threshold, rule, value, cover, node_start, tree_output,
                        trees, max_depth, rows_output, phi, out, first, last):
    seg = max_depth + 2
    pf = np.zeros(seg * (seg + 1), np.int64)
    pz = np.zeros(seg * (seg + 1))
    po = np.zeros(seg * (seg + 1))
    pw = np.zeros(seg * (seg + 1))
    size = 2 * seg + 2
    s_node = np.zeros(size, np.int64)
    s_level = np.zeros(size, np.int64)
    s_depth = np.zeros(size, np.int64)
    s_zero = np.zeros(size)
    s_one = np.zeros(size)
    s_feat = np.zeros(size, np.int64)
    for i in range(first, last):
        for t in trees:
            if tree_output[t] != rows_output[i]:
                continue
            top = 0
            s_node[0], s_level[0], s_depth[0], s_zero[0], s_one[0], s_feat[0] = node_start[t], 1, 0, 1.0, 1.0, -1
            top = 1
            while top > 0:
                top -= 1
                node, level, depth = s_node[top], s_level[top], s_depth[top]
                at, above = level * seg, (level - 1) * seg
                for k in range(depth):
                    pf[at + k], pz[at + k], po[at + k], pw[at + k] = pf[above + k], pz[above + k], po[above + k], \
                        pw[above + k]
                _extend(pf, pz, po, pw, at, depth, s_zero[top], s_one[top], s_feat[top])
                if left[node] < 0:
                    for k in range(1, depth + 1):
                        w = _unwound_sum(pz, po, pw, at, depth, k)
                        phi[i, pf[at + k]] += w * (po[at + k] - pz[at + k]) * value[node]
                    continue
                goes_left = goes(X[i, feature[node]], node, threshold, rule)
                hot, cold = (left[node], right[node]) if goes_left else (right[node], left[node])
                both = cover[left[node]] + cover[right[node]]
                hot_share = cover[hot] / both if both > 0 else 0.5
                cold_share = cover[cold] / both if both > 0 else 0.5
                zero, one = 1.0, 1.0
                f = feature[node]
                for k in range(depth + 1):  # already split on this feature above: undo, to redo here
                    if pf[at + k] == f:
                        zero, one = pz[at + k], po[at + k]
                        _unwind(pf, pz, po, pw, at, depth, k)
                        depth -= 1
                        break
                s_node[top], s_level[top], s_depth[top] = cold, level + 1, depth + 1
                s_zero[top], s_one[top], s_feat[top] = cold_share * zero, 0.0, f
                top += 1
                s_node[top], s_level[top], s_depth[top] = hot, level + 1, depth + 1
                s_zero[top], s_one[top], s_feat[top] = hot_share * zero, one, f
                top += 1
            node = node_start[t]  # the row's own leaf: the explained output
            while left[node] >= 0:
                node = left[node] if goes(X[i, feature[node]], node, threshold, rule) else right[node]
            out[i] += value[node]
