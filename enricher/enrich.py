"""Apply a model's serving artifacts to a validated batch -> rows in the storage layout."""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from models.enrichment import FeatureBatch, checked_output

from . import metrics
from .clickhouse import STORE_COLUMNS
from .contract import ModelRows
from .serving import Active

log = logging.getLogger(__name__)


def enrich(rows: ModelRows, active: dict[str, Active], ingested_at_us: int) -> pa.Table:
    """One model's batch as the storage table wants it, enrichment columns filled."""
    return enrich_many([(rows, active)], ingested_at_us)


def enrich_many(parts: list[tuple[ModelRows, dict[str, Active]]], ingested_at_us: int) -> pa.Table:
    """Batches of models that share one layout, as one storage-layout table.

    Each model's enrichments run on that model's rows; everything else (the
    feature maps, ids, casts) is built once for all of them, so a batch spread
    over many models pays those costs once, not once per model.

    An enrichment that is off, not trained yet, or fails on a model's rows
    gives NULLs there (never a made-up value), and its version column is NULL too.
    """

    spec = parts[0][0].spec
    counts = [rows.num_rows for rows, _ in parts]
    n = sum(counts)
    outputs: dict[str, list[pa.Array]] = {}  # enrichment column -> one array per model
    for k, (rows, active) in enumerate(parts):
        batch = FeatureBatch(rows.values, rows.num_rows)
        for name, act in active.items():
            started = time.perf_counter()
            try:
                out = checked_output(name, act.fitted.transform(batch), rows.num_rows)
            except Exception:  # noqa: BLE001 - whatever an enrichment does, the rows go on
                metrics.ENRICHMENT_ERRORS.labels(rows.spec.model_id, name).inc()
                log.exception("model %s: %s v%s failed on a batch of %d rows; its columns are NULL",
                              rows.spec.model_id, name, act.version, rows.num_rows)
                continue
            metrics.ENRICHMENT_SECONDS.labels(name).observe(time.perf_counter() - started)
            out[f"{name}_version"] = pa.array(np.full(rows.num_rows, act.version, np.uint32))
            for col, arr in out.items():
                outputs.setdefault(col, [None] * len(parts))[k] = arr

    columns: dict[str, pa.Array] = {}
    for col, arrays in outputs.items():
        arrow_type = STORE_COLUMNS[col][1]
        columns[col] = pa.concat_arrays([
            pa.nulls(counts[k], arrow_type) if a is None else (a if a.type == arrow_type else a.cast(arrow_type))
            for k, a in enumerate(arrays)])

    def joined(get) -> pa.Array:
        arrays = [get(rows) for rows, _ in parts]
        return arrays[0] if len(arrays) == 1 else pa.concat_arrays(arrays)

    numeric = [c.name for c in spec.columns if c.numeric]
    categorical = [c.name for c in spec.columns if not c.numeric]
    values = {c.name: joined(lambda r, name=c.name: r.values[name]) for c in spec.columns}
    model_ids = pa.array([rows.spec.model_id for rows, _ in parts])
    owner = np.repeat(np.arange(len(parts), dtype=np.int32), counts)
    columns["model_id"] = pa.DictionaryArray.from_arrays(owner, model_ids).cast(pa.string())
    columns["inference_id"] = joined(lambda r: r.inference_id)
    columns["timestamp"] = joined(lambda r: r.timestamp)
    columns["numeric"] = _map(numeric, [values[c] for c in numeric], n, pa.float64())
    columns["categorical"] = _map(categorical, [values[c] for c in categorical], n, pa.string())
    suffix = "" if spec.prediction_type == "numeric" else "_class"
    columns["prediction" + suffix] = joined(lambda r: r.prediction)
    columns["label" + suffix] = joined(lambda r: r.label)
    columns["_ingested_at"] = pa.array(np.full(n, ingested_at_us, np.int64)).cast(STORE_COLUMNS["_ingested_at"][1])
    columns["_partition"] = pa.array(np.concatenate([r.partition for r, _ in parts]), pa.uint32())
    columns["_offset"] = pa.array(np.concatenate([r.offset for r, _ in parts]), pa.uint64())

    arrays = []
    for col, (_, arrow_type) in STORE_COLUMNS.items():
        arr = columns.get(col)
        if arr is None:
            arr = pa.nulls(n, arrow_type)
        arrays.append(arr if arr.type == arrow_type else arr.cast(arrow_type))
    return pa.Table.from_arrays(arrays, names=list(STORE_COLUMNS))


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
