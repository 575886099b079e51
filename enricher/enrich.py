"""Apply a model's serving artifacts to a validated batch -> rows in the storage layout."""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from models.enrichment import FeatureBatch

from . import metrics
from .clickhouse import STORE_COLUMNS
from .contract import ModelRows
from .serving import Active

log = logging.getLogger(__name__)


def enrich(rows: ModelRows, active: dict[str, Active], ingested_at_us: int) -> pa.Table:
    """The batch as the storage table wants it, enrichment columns filled.

    An enrichment that is off, not trained yet, or fails on this batch gives
    NULLs (never a made-up value), and its version column is NULL too.
    """
    n = rows.num_rows
    spec = rows.spec
    columns: dict[str, pa.Array] = {}
    batch = FeatureBatch(rows.values, n)
    for name, act in active.items():
        started = time.perf_counter()
        try:
            out = act.fitted.transform(batch)
        except Exception:
            metrics.ENRICHMENT_ERRORS.labels(spec.model_id, name).inc()
            log.exception("model %s: %s v%s failed on a batch of %d rows; its columns are NULL",
                          spec.model_id, name, act.version, n)
            continue
        metrics.ENRICHMENT_SECONDS.labels(name).observe(time.perf_counter() - started)
        columns.update(out)
        columns[f"{name}_version"] = pa.array(np.full(n, act.version, np.uint32))

    numeric = [c.name for c in spec.columns if c.numeric]
    categorical = [c.name for c in spec.columns if not c.numeric]
    columns["model_id"] = _repeat(spec.model_id, n)
    columns["inference_id"] = rows.inference_id
    columns["timestamp"] = rows.timestamp
    columns["numeric"] = _map(numeric, [rows.values[c] for c in numeric], n, pa.float64())
    columns["categorical"] = _map(categorical, [rows.values[c] for c in categorical], n, pa.string())
    suffix = "" if spec.prediction_type == "numeric" else "_class"
    columns["prediction" + suffix] = rows.prediction
    columns["label" + suffix] = rows.label
    columns["_ingested_at"] = pa.array(np.full(n, ingested_at_us, np.int64)).cast(STORE_COLUMNS["_ingested_at"][1])
    columns["_partition"] = pa.array(rows.partition, pa.uint32())
    columns["_offset"] = pa.array(rows.offset, pa.uint64())

    arrays = []
    for col, (_, arrow_type) in STORE_COLUMNS.items():
        arr = columns.get(col)
        if arr is None:
            arr = pa.nulls(n, arrow_type)
        arrays.append(arr if arr.type == arrow_type else arr.cast(arrow_type))
    return pa.Table.from_arrays(arrays, names=list(STORE_COLUMNS))


def _repeat(value: str, n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), pa.array([value])).cast(pa.string())


def _map(names: list[str], values: list[pa.Array], n: int, item_type: pa.DataType) -> pa.Array:
    """One map per row, {name: value}, built column-wise: keys repeat, items interleave."""
    k = len(names)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
    if k == 0:
        return pa.MapArray.from_arrays(offsets, pa.array([], pa.string()), pa.array([], item_type))
    keys = pa.DictionaryArray.from_arrays(np.tile(np.arange(k, dtype=np.int32), n), pa.array(names)).cast(pa.string())
    stacked = pa.concat_arrays([v.cast(item_type) for v in values])
    order = (np.arange(k, dtype=np.int64)[None, :] * n + np.arange(n, dtype=np.int64)[:, None]).ravel()
    return pa.MapArray.from_arrays(offsets, keys, stacked.take(pa.array(order)))
