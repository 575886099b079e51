"""Turns a model's features into the float matrix tree models are fitted on.

Numeric features pass through. A missing value (a reference gap, or a null
in a nullable feature) becomes, by `nulls`: the feature's reference median
(`median`, anomaly detection: a gap is not evidence of an anomaly), or NaN
(`nan`, explanations: tree models route a missing value their own way, and
the explanation follows the model).
Categorical features become one column each, whatever the number of
categories, in one of two ways:
- `frequency` (anomaly detection): the frequency of the value in the
  reference data, 0 for a value never seen there: a rare or new category is
  exactly what an anomaly detector should find easy to isolate;
- `code` (explanations): the value's rank by frequency in the reference (0 the
  commonest), -1 for a value never seen there: distinct categories stay
  distinct, so a tree can split them apart (two categories of equal frequency
  would be one under `frequency`), and each feature's attribution is that one
  column's;
- `model` (explaining the user's own model file): the code the model itself
  was trained on (its position in the categories the file names), NaN for a
  value the model never saw or a null, as the libraries read such a value.

Everything is columnar: a batch is a mapping of feature name -> Arrow array.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .spec import ModelSpec

Columns = Mapping[str, "pa.Array | pa.ChunkedArray"]


class FeatureEncoder:
    def __init__(self, names: list[str], kinds: list[str], medians: dict[str, float],
                 categories: dict[str, list[str]], frequencies: dict[str, list[float]],
                 categorical: str = "frequency", nulls: str = "median"):
        if categorical not in ("frequency", "code", "model"):
            raise ValueError(f"categorical encoding {categorical!r}: frequency, code or model")
        if nulls not in ("median", "nan"):
            raise ValueError(f"nulls {nulls!r}: median or nan")
        self.categorical = categorical
        self.nulls = nulls
        self.names = names
        self.kinds = kinds
        self.medians = medians
        self.categories = categories
        self.frequencies = frequencies
        self._value_sets = {n: pa.array(c, pa.string()) for n, c in categories.items()}
        # last slot: frequency of a category the reference never showed
        self._freq_lookup = {n: np.append(np.asarray(f, np.float32), np.float32(0.0))
                             for n, f in frequencies.items()}
        if categorical == "code":  # last slot: a category the reference never showed
            self._freq_lookup = {n: np.append(np.arange(len(f), dtype=np.float32), np.float32(-1.0))
                                 for n, f in frequencies.items()}
        if categorical == "model":  # last slot: a category the model never saw
            self._freq_lookup = {n: np.append(np.arange(len(c), dtype=np.float64), np.nan)
                                 for n, c in categories.items()}

    @classmethod
    def fit(cls, spec: ModelSpec, reference: pa.Table, max_categories: int = 10_000,
            categorical: str = "frequency", nulls: str = "median",
            model_categories: dict[str, list[str]] | None = None) -> "FeatureEncoder":
        """`model_categories` (with `categorical="model"`): each categorical feature's
        categories as the user's model file names them, by code."""
        medians, categories, frequencies = {}, {}, {}
        n = reference.num_rows
        for col in spec.features:
            values = reference.column(col.name)
            if col.numeric:
                median = pc.approximate_median(values).as_py()
                medians[col.name] = 0.0 if median is None else float(median)
            elif categorical == "model":
                categories[col.name] = list(model_categories[col.name])
                frequencies[col.name] = []
            else:
                counts = pc.value_counts(pc.drop_null(values)).to_pylist()
                counts.sort(key=lambda vc: -vc["counts"])
                counts = counts[:max_categories]
                categories[col.name] = [vc["values"] for vc in counts]
                frequencies[col.name] = [vc["counts"] / n for vc in counts]
        return cls(spec.feature_names, [c.type for c in spec.features], medians, categories, frequencies,
                   categorical, nulls)

    def transform(self, columns: Columns, num_rows: int) -> np.ndarray:
        # float64: a value on a split threshold must reach the walk as the library reads it
        # (LightGBM compares doubles; the ensemble rounds to float32 where its library does)
        out = np.empty((num_rows, len(self.names)), dtype=np.float64)
        for j, (name, kind) in enumerate(zip(self.names, self.kinds)):
            values = columns[name]
            if kind == "numeric":
                if values.null_count:  # reference gaps, and nulls in a nullable feature
                    values = pc.fill_null(values, self.medians[name] if self.nulls == "median" else float("nan"))
                out[:, j] = _to_numpy(values)
            else:
                codes = pc.index_in(values, value_set=self._value_sets[name])
                codes = _to_numpy(pc.fill_null(codes, -1)).astype(np.int64)
                out[:, j] = self._freq_lookup[name][codes]
        return out

    def to_json(self) -> dict:
        return {"names": self.names, "kinds": self.kinds, "medians": self.medians,
                "categories": self.categories, "frequencies": self.frequencies, "categorical": self.categorical,
                "nulls": self.nulls}

    @classmethod
    def for_spec(cls, doc: dict, spec: ModelSpec) -> "FeatureEncoder":
        """An artifact's encoder, refused if the model's features have changed since it was fitted."""
        encoder = cls.from_json(doc)
        if encoder.names != spec.feature_names:
            raise ValueError(f"artifact was trained on features {encoder.names}, "
                             f"the model now has {spec.feature_names}: retrain it")
        return encoder

    @classmethod
    def from_json(cls, doc: dict) -> "FeatureEncoder":
        return cls(doc["names"], doc["kinds"], doc["medians"], doc["categories"], doc["frequencies"],
                   doc.get("categorical", "frequency"), doc.get("nulls", "median"))


def _to_numpy(values: "pa.Array | pa.ChunkedArray") -> np.ndarray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values.to_numpy(zero_copy_only=False)


class EncoderPool:
    """Many models' encoders of one layout (the same features, in order, of the same
    kinds) applied to their rows together, as each would encode its own.

    Each row carries its member's index. A numeric null takes its member's fill
    value; a categorical value is looked up once in the union of the members'
    categories, then in a sorted table of (member, category) keys, so the work
    is per batch, not per model, and the tables hold each member's categories
    once (no members x categories matrix).
    """

    def __init__(self, encoders: list[FeatureEncoder]):
        first = encoders[0]
        if any(e.names != first.names or e.kinds != first.kinds for e in encoders):
            raise ValueError("pooled encoders must share their features and kinds")
        self.names, self.kinds = first.names, first.kinds
        self._fill: dict[str, np.ndarray] = {}
        self._union: dict[str, pa.Array] = {}
        self._keys: dict[str, np.ndarray] = {}
        self._values: dict[str, np.ndarray] = {}
        self._unseen: dict[str, np.ndarray] = {}
        for name, kind in zip(self.names, self.kinds):
            if kind == "numeric":
                self._fill[name] = np.array([e.medians[name] if e.nulls == "median" else np.nan for e in encoders],
                                            np.float64)
                continue
            index: dict[str, int] = {}
            keys, values = [], []
            for m, e in enumerate(encoders):
                lookup = e._freq_lookup[name]
                codes = np.array([index.setdefault(c, len(index)) for c in e.categories[name]], np.int64)
                keys.append(codes)  # the member is folded in below, once the union's size is known
                values.append(np.asarray(lookup[:len(codes)], np.float64))
            width = max(len(index), 1)
            keys = np.concatenate([k + m * width for m, k in enumerate(keys)]) if keys else np.zeros(0, np.int64)
            values = np.concatenate(values) if values else np.zeros(0)
            order = np.argsort(keys, kind="stable")
            self._union[name] = pa.array(list(index), pa.string())
            self._keys[name], self._values[name] = keys[order], values[order]
            self._unseen[name] = np.array([e._freq_lookup[name][-1] for e in encoders], np.float64)

    def transform(self, columns: Columns, num_rows: int, member: np.ndarray) -> np.ndarray:
        out = np.empty((num_rows, len(self.names)), dtype=np.float64)
        for j, (name, kind) in enumerate(zip(self.names, self.kinds)):
            values = columns[name]
            if kind == "numeric":
                out[:, j] = _to_numpy(values)
                if values.null_count:
                    nulls = _to_numpy(values.is_null())
                    out[nulls, j] = self._fill[name][member[nulls]]
                continue
            union = self._union[name]
            code = _to_numpy(pc.fill_null(pc.index_in(values, value_set=union), -1)).astype(np.int64)
            keys = member.astype(np.int64) * max(len(union), 1) + code
            table = self._keys[name]
            at = np.minimum(np.searchsorted(table, keys), max(len(table) - 1, 0))
            hit = (code >= 0) & (table[at] == keys) if len(table) else np.zeros(num_rows, bool)
            out[:, j] = np.where(hit, self._values[name][at] if len(table) else 0.0, self._unseen[name][member])
        return out
