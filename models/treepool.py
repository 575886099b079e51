"""Many models' TreeSHAP ensembles explained in one compiled call (serving a stream spread
over many models: models/explainability.py ExplainabilityPool).

Explained model by model, a batch over a thousand models makes a thousand
kernel calls of a handful of rows each, and around each call the same few
dozen numpy and Arrow operations (encoding, choosing the class, building
columns): at 1,000 models that Python took ~3x the kernel's own time. Here the
members' trees and tables are concatenated into one ensemble's arrays, every
index rebased into them (node, unit, table, work, categorical offsets), and
one compiled call walks the rows run by run (a run: consecutive rows of one
member), each run through its own member's trees with the same kernel
(`treeshap._explain`) a member uses alone: the same operations in the same
order, so the attributions are the same numbers, bit for bit.

The members' arrays that need no rebasing (thresholds, values, features, the
tables themselves: ~80% of an ensemble's bytes) become views of the pool's,
so they are held once; the rebased index arrays are the pool's own copies.

Trees explained by the recursion (too deep for tables) do not pool: an
ensemble that has any serves on its own.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .forestpool import _give_back_freed_memory
from .treeshap import TreeEnsemble, _any_split, _explain, _numeric_split, _predict, library_rows

# Arrays concatenated as they are (no index in them): the members' own become views of them.
_SHARED = ("feature", "threshold", "value", "decision", "cat_words", "tree_output")
_SHARED_TABLES = ("node_pos", "unit_m", "unit_feat", "table")


def can_pool(ensemble: TreeEnsemble) -> bool:
    """Only ensembles explained wholly by tables (no tree left to the recursion)."""
    return ensemble.n_path_trees == 0


def pool_key(ensemble: TreeEnsemble) -> tuple:
    """Ensembles with equal keys can share a pool: rows read alike, the same outputs."""
    features, precision, missing, flush_zero = ensemble.reading
    return (features, precision, "nan" if math.isnan(missing) else missing, flush_zero, ensemble.strict,
            ensemble.n_outputs)


class EnsemblePool:
    def __init__(self, ensembles: list[TreeEnsemble]):
        if not ensembles:
            raise ValueError("an ensemble pool needs at least one ensemble")
        if len({pool_key(e) for e in ensembles}) != 1 or not all(can_pool(e) for e in ensembles):
            raise ValueError("pooled ensembles must read rows alike, have the same outputs and no recursion trees")
        first = ensembles[0]
        self.reading, self.strict, self.n_outputs = first.reading, first.strict, first.n_outputs
        self.n_features = first.n_features

        def starts(sizes) -> np.ndarray:
            return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

        nodes = starts([len(e.left) for e in ensembles])
        trees = starts([e.n_trees for e in ensembles])
        work = starts([len(e.work) for e in ensembles])
        units = starts([len(e.tables["unit_m"]) for e in ensembles])
        unit_features = starts([len(e.tables["unit_feat"]) for e in ensembles])
        table = starts([len(e.tables["table"]) for e in ensembles])
        cats = starts([len(e.cat_bits) for e in ensembles])
        if max(nodes[-1], work[-1], units[-1]) >= np.iinfo(np.int32).max:
            raise ValueError("too many nodes for one pool")
        self.tree_start = trees

        def index(get, offsets, dtype, closed: bool = False) -> np.ndarray:
            """Each member's index array, rebased by its offset (-1, none, stays -1); `closed`:
            a start array (n + 1 entries) whose members' last entries make one final one."""
            parts = []
            for e, at in zip(ensembles, offsets):
                a = get(e).astype(np.int64)
                parts.append(np.where(a >= 0, a + at, -1)[:-1] if closed else np.where(a >= 0, a + at, -1))
            if closed:
                parts.append([offsets[-1]])
            return np.ascontiguousarray(np.concatenate(parts), dtype)

        self.left = index(lambda e: e.left, nodes, np.int32)
        self.right = index(lambda e: e.right, nodes, np.int32)
        self.node_start = index(lambda e: e.node_start, nodes, np.int64, closed=True)
        self.work = index(lambda e: e.work, nodes, np.int32)
        self.work_start = index(lambda e: e.work_start, work, np.int64, closed=True)
        self.node_unit = index(lambda e: e.tables["node_unit"], units, first.tables["node_unit"].dtype)
        self.unit_fs = index(lambda e: e.tables["unit_fs"], unit_features, np.int64, closed=True)
        self.unit_tab = index(lambda e: e.tables["unit_tab"], table, np.int64, closed=True)
        self.cat_offset = np.concatenate([e.cat_offset + at for e, at in zip(ensembles, cats)]).astype(np.int64)
        self.cat_bits = np.concatenate([e.cat_bits for e in ensembles]).astype(np.uint32)
        self.base = np.stack([e.tables["base"] for e in ensembles]).astype(np.float64)  # [member, output]
        self.init = np.stack([e.init for e in ensembles]).astype(np.float64)
        # The shared arrays: one member at a time, each pointed at its part as soon as it is
        # written, so its own copy goes then (held about once even while the pool is built).
        for name, offsets in [(k, nodes) for k in _SHARED[:-1]] + [("tree_output", trees)]:
            setattr(self, name, self._share(ensembles, offsets, lambda e, k=name: getattr(e, k),
                                            lambda e, v, k=name: setattr(e, k, v)))
        for name, offsets in (("node_pos", nodes), ("unit_m", units), ("unit_feat", unit_features),
                              ("table", table)):
            setattr(self, name, self._share(ensembles, offsets, lambda e, k=name: e.tables[k],
                                            lambda e, v, k=name: e.tables.__setitem__(k, v)))
        self._goes = _any_split if len(self.cat_bits) else _numeric_split
        _give_back_freed_memory()
        self.explain(np.zeros((1, self.n_features)), np.zeros(1, np.intp))  # compiled now, not on a batch

    @staticmethod
    def _share(ensembles, offsets, get, put) -> np.ndarray:
        first = get(ensembles[0])
        pooled = np.empty(int(offsets[-1]), first.dtype)
        for k, (e, start, stop) in enumerate(zip(ensembles, offsets[:-1], offsets[1:])):
            if k % 128 == 127:
                _give_back_freed_memory()
            pooled[start:stop] = get(e)
            put(e, pooled[start:stop])
        return pooled

    def __len__(self) -> int:
        return len(self.tree_start) - 1

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))

    def _rule(self) -> tuple:
        return self.decision, self.cat_offset, self.cat_words, self.cat_bits, self.strict

    def _runs(self, member: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Consecutive rows of one member: (where each run starts, and n at the end; its member)."""
        member = np.asarray(member, np.intp)
        if member.shape != (n,):
            raise ValueError(f"{len(member)} member indexes for {n} rows")
        if n and (member.min() < 0 or member.max() >= len(self)):
            raise ValueError("member index out of range")
        starts = np.flatnonzero(np.diff(member)) + 1 if n else np.zeros(0, np.int64)
        run_start = np.concatenate([[0], starts, [n]]).astype(np.int64) if n else np.zeros(1, np.int64)
        return run_start, np.ascontiguousarray(member[run_start[:-1]], np.int64)

    def predict_raw(self, X: np.ndarray, member: np.ndarray) -> np.ndarray:
        """Each row's raw outputs under its own member's trees, (rows, outputs)."""
        X = library_rows(X, self.reading)
        run_start, run_member = self._runs(member, X.shape[0])
        out = np.zeros((X.shape[0], self.n_outputs))
        _predict_runs(X, self._goes, self.left, self.right, self.feature, self.threshold, self._rule(), self.value,
                      self.node_start, self.tree_output, self.tree_start, run_start, run_member, out)
        return out + self.init[member]

    def explain(self, X: np.ndarray, member: np.ndarray, output: np.ndarray | int = 0):
        """As TreeEnsemble.explain, each row under its own member's ensemble (`member[i]`
        indexes the ensembles this pool was built from)."""
        X = library_rows(X, self.reading)
        n = X.shape[0]
        run_start, run_member = self._runs(member, n)
        rows_output = np.full(n, output, np.int32) if np.isscalar(output) else np.ascontiguousarray(output, np.int32)
        if rows_output.shape != (n,) or (n and (rows_output.min() < 0 or rows_output.max() >= self.n_outputs)):
            raise ValueError(f"output: one of 0..{self.n_outputs - 1} per row")
        phi = np.zeros((n, self.n_features))
        value = np.zeros(n)
        _explain_runs(X, self._goes, self.left, self.right, self.feature, self.threshold, self._rule(), self.value,
                      self.node_start, self.tree_output, self.work, self.work_start, self.node_pos, self.node_unit,
                      self.unit_m, self.unit_fs, self.unit_feat, self.unit_tab, self.table, self.tree_start,
                      run_start, run_member, rows_output, phi, value)
        member = np.asarray(member, np.intp)
        return phi, self.base[member, rows_output], value + self.init[member, rows_output]


# One call for every run of rows: each run is the single-ensemble kernel on its rows and
# its member's trees (their slice of the pooled node_start and work_start), so pooled and
# alone are the same loops.

@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _explain_runs(X, goes, left, right, feature, threshold, rule, value, node_start, tree_output, work, work_start,
                  node_pos, node_unit, unit_m, unit_fs, unit_feat, unit_tab, table, tree_start, run_start, run_member,
                  rows_output, phi, out):  # pragma: no cover - compiled
    for r in range(len(run_member)):
        a, b = run_start[r], run_start[r + 1]
        t0, t1 = tree_start[run_member[r]], tree_start[run_member[r] + 1]
        _explain(X[a:b], goes, left, right, feature, threshold, rule, value, node_start[t0:t1 + 1],
                 tree_output[t0:t1], work, work_start[t0:t1 + 1], node_pos, node_unit, unit_m, unit_fs, unit_feat,
                 unit_tab, table, rows_output[a:b], phi[a:b], out[a:b])


@numba.njit(cache=True, nogil=True)
def _predict_runs(X, goes, left, right, feature, threshold, rule, value, node_start, tree_output, tree_start,
                  run_start, run_member, out):  # pragma: no cover - compiled
    for r in range(len(run_member)):
        a, b = run_start[r], run_start[r + 1]
        t0, t1 = tree_start[run_member[r]], tree_start[run_member[r] + 1]
        _predict(X[a:b], goes, left, right, feature, threshold, rule, value, node_start[t0:t1 + 1],
                 tree_output[t0:t1], out[a:b])
