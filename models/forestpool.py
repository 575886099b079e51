"""Many models' Isolation Forests scored in one compiled pass (serving a stream spread
over many models: models/anomaly.py AnomalyPool).

A stream spread over a thousand models gives each model a handful of rows per
batch. Walked model by model (models/forest.py), each model costs a few dozen
numpy calls per batch whatever its rows; walked together as arrays, the walk is
bound by memory: a thousand forests are ~270 MB of nodes, and a vectorised
level-by-level walk touches three arrays (feature, threshold, children) at
scattered places for every row, tree and level, leaves included.

Here the forests' nodes are packed into one table of 16-byte records (feature,
threshold, left, right: a node is one cache line, and its children, written
depth first, are usually the next records), and a compiled loop walks each
model's rows tree by tree, so a tree's upper nodes stay in cache across the
model's rows, and each path stops at its leaf. A leaf points at itself and
keeps its path length where a split keeps its threshold.

The members' own arrays become strided views of the table (a leaf's threshold
slot is its value; the vectorised walk of forest.py never reads either at a
leaf, which loops on itself), so the nodes are held once.

Exactness: the same float32 comparisons as forest.py; a row's path lengths
are summed in float64 tree by tree, where forest.py's numpy sum adds pairwise:
the scores agree to ~1e-15.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import numba
import numpy as np

from .forest import CompactForest


class ForestPool:
    def __init__(self, forests: list[CompactForest]):
        if not forests:
            raise ValueError("a forest pool needs at least one forest")
        trees = {len(f.roots) for f in forests}
        widths = {f.n_features for f in forests}
        if len(trees) != 1 or len(widths) != 1:
            raise ValueError("pooled forests must have the same number of trees and features")
        sizes = np.array([len(f.feature) for f in forests], np.int64)
        if sizes.sum() >= np.iinfo(np.int32).max:
            raise ValueError("too many nodes for one pool")
        self.offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.size = sizes
        records = np.empty((int(sizes.sum()), 4), np.int32)
        real = records.view(np.float32)
        # One member at a time, each pointed at its records as soon as they are written: its
        # own arrays go then, so the nodes are held about once even while the pool is built
        # (the table's pages are only taken as they are written).
        for k, (f, start, size) in enumerate(zip(forests, self.offset, sizes)):
            if k % 128 == 127:
                _give_back_freed_memory()
            rows = slice(start, start + size)
            leaf = f.children[:, 0] == np.arange(size)
            records[rows, 0] = f.feature
            real[rows, 1] = np.where(leaf, f.value, f.threshold)
            records[rows, 2:4] = f.children
            f.feature, f.children = records[rows, 0], records[rows, 2:4]
            f.threshold = f.value = real[rows, 1]
        self.records, self.real = records, real
        self.roots = np.stack([f.roots for f in forests]).astype(np.int32)  # local, [members, trees]
        self.denominator = np.array([f.denominator for f in forests], np.float64)
        self.depth = max(f.depth for f in forests)
        self.n_features = widths.pop()
        _give_back_freed_memory()
        self.score(np.zeros((1, self.n_features), np.float32), np.zeros(1, np.intp))  # compiled now, not on a batch

    def __len__(self) -> int:
        return len(self.offset)

    @property
    def nbytes(self) -> int:
        return self.records.nbytes + self.roots.nbytes

    def score(self, X: np.ndarray, member: np.ndarray) -> np.ndarray:
        """Each row's anomaly score under its own member's forest (`member[i]` indexes the
        forests this pool was built from)."""
        if X.shape[1] != self.n_features:
            raise ValueError(f"forests expect {self.n_features} features, got {X.shape[1]}")
        X = np.ascontiguousarray(X, dtype=np.float32)
        member = np.asarray(member, np.intp)
        if len(member) != len(X):
            raise ValueError(f"{len(member)} member indexes for {len(X)} rows")
        if len(member) and (member.min() < 0 or member.max() >= len(self.offset)):
            raise ValueError("member index out of range")
        order = np.argsort(member, kind="stable")
        rows = np.bincount(member, minlength=len(self.offset))
        paths = np.zeros(len(X))
        _walk(X, member, order, rows, self.records, self.real, self.roots, self.offset, self.size, self.depth,
              paths)
        denominator = self.denominator[member]
        with np.errstate(divide="ignore", invalid="ignore"):
            scores = np.exp2(-paths / denominator)
        scores[denominator == 0] = 1.0
        return scores


def _give_back_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim). The members'
    own arrays, freed as the pool takes their nodes, sit in the heap, which glibc does not
    shrink by itself: without this a worker of 1,000 models kept ~0.25 GB it no longer
    used. Elsewhere than glibc, nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_LANES = 16  # trees of one row walked in lockstep: independent chains of loads the CPU overlaps

# A member with this many rows in a call has its records read once in sequence before
# its rows are walked. A thousand forests (~200 MB) are far beyond the caches, and the
# walk reaches a member's nodes at scattered places: each a wait on memory. Read in
# sequence (one load per 64-byte line: the prefetcher runs ahead), the member's ~200 KB
# are then in L2 for its walk. On our machines (1,000 members, 100 trees): 277k -> 354k
# rows/s at 30 rows per member, 194k -> 251k at 10, 126k -> 137k at 3; at 1 row per
# member reading the whole forest costs more than the one path it spares (109k -> 76k).
_READ_AHEAD_ROWS = 4


@numba.njit(cache=True, nogil=True)
def _walk(X, member, order, rows, records, real, roots, offset, size, depth, paths):  # pragma: no cover - compiled
    n, trees = len(order), roots.shape[1]
    node = np.empty(_LANES, np.int64)
    last = -1
    read = 0
    for k in range(n):  # each member's rows together: its trees' tops stay in cache
        i = order[k]
        m = member[i]
        base = offset[m]
        if m != last:
            last = m
            if rows[m] >= _READ_AHEAD_ROWS:
                for g in range(base, base + size[m], 4):  # 4 records of 16 bytes: a cache line
                    read += records[g, 0]
        total = 0.0
        for lo in range(0, trees, _LANES):
            width = min(_LANES, trees - lo)
            for t in range(width):
                node[t] = base + roots[m, lo + t]
            # `depth` steps without a branch on the data (a leaf loops on itself): no
            # mispredicted jumps, and the lanes' loads overlap
            for _ in range(depth):
                for t in range(width):
                    g = node[t]
                    node[t] = base + records[g, 2 + (X[i, records[g, 0]] > real[g, 1])]
            for t in range(width):  # tree order, as the model's own sum
                total += real[node[t], 1]
        paths[i] = total
    return read  # used, so the compiler keeps the reads
