"""A model's reference profile: what drift is measured against.

Per feature (and attribute), from the reference data:
- numeric: bin edges at the reference's quantiles (`bins` bins, fewer where
  quantiles tie), the count in each bin, and the values themselves (sampled
  down to MAX_VALUES) for the Kolmogorov-Smirnov statistic;
- categorical: the MAX_CATEGORIES most frequent categories, each a bin, plus
  one bin for every other value (a category never seen in the reference
  lands there too).

Bin i of a numeric feature holds edges[i-1] <= x < edges[i] (the first from
-inf, the last to +inf): x's bin is the number of edges <= x, which is
`numpy.searchsorted(edges, x, side="right")` here and
`arrayCount(e -> e <= x, edges)` in ClickHouse. Missing values are in no bin.

This module knows nothing of ClickHouse: enricher/store/drift.py stores profiles
there and computes drift against them in SQL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .spec import ModelSpec

MAX_CATEGORIES = 50
MAX_VALUES = 100_000  # reference values kept per numeric feature for KS (a seeded sample beyond)


@dataclass
class FeatureProfile:
    feature: str
    kind: str                 # "numeric" or "categorical"
    counts: np.ndarray        # per bin, int64; every bin present, empty ones as 0
    edges: np.ndarray | None = None       # numeric: interior edges, len(counts) - 1 of them
    categories: list[str] | None = None   # categorical: one per bin but the last ("other")
    values: np.ndarray | None = None      # numeric: reference values (sampled to MAX_VALUES)

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def profile(spec: ModelSpec, reference: pa.Table, bins: int = 10) -> list[FeatureProfile]:
    """The profile of every feature and attribute present in the reference data."""
    if bins < 2:
        raise ValueError(f"drift bins must be at least 2, got {bins}")
    out = []
    for col in spec.columns:
        if col.name not in reference.column_names:
            continue
        arr = reference.column(col.name).combine_chunks()
        out.append(_numeric(col.name, arr, bins) if col.numeric else _categorical(col.name, arr))
    return out


def _numeric(name: str, arr: pa.Array, bins: int) -> FeatureProfile:
    values = arr.cast(pa.float64()).drop_null().to_numpy()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return FeatureProfile(name, "numeric", np.zeros(1, np.int64), np.empty(0), values=values)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    if values.size > MAX_VALUES:
        values = np.random.default_rng(0).choice(values, MAX_VALUES, replace=False)
    return FeatureProfile(name, "numeric", counts.astype(np.int64), edges, values=np.sort(values))


def _categorical(name: str, arr: pa.Array) -> FeatureProfile:
    counted = pc.value_counts(arr.cast(pa.string()).drop_null())
    cats = counted.field("values").to_pylist()
    freq = counted.field("counts").to_numpy()
    order = sorted(range(len(cats)), key=lambda i: (-freq[i], cats[i]))  # most frequent first, ties by name
    kept = [cats[i] for i in order[:MAX_CATEGORIES]]
    counts = [int(freq[i]) for i in order[:MAX_CATEGORIES]] + [int(sum(freq[i] for i in order[MAX_CATEGORIES:]))]
    return FeatureProfile(name, "categorical", np.asarray(counts, np.int64), categories=kept)
