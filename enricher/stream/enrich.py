"""Apply a model's serving artifacts to a validated batch -> rows in the storage layout."""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from enricher import metrics
from enricher.models.catalog import checked_output, model_outputs
from enricher.models.enrichment import version_column
from enricher.store.clickhouse import FIXED_COLUMNS, spec_columns
from enricher.stream.contract import ModelRows
from enricher.stream.serving import Active

log = logging.getLogger(__name__)


def enrich(rows: ModelRows, active: dict[str, Active], ingested_at_us: int) -> pa.Table:
    """One model's batch as the storage table wants it, enrichment columns filled."""
    return enrich_many([(rows, active)], ingested_at_us)


def enrich_many(parts: list[tuple[ModelRows, dict[str, Active]]], ingested_at_us: int) -> pa.Table:
    """Batches of models that share one layout and slots (`storage_group`), as one storage-layout table.

    Each model's enrichments run on that model's rows; everything else (the
    slot columns, ids, casts) is built once for all of them, so a batch spread
    over many models pays those costs once, not once per model.

    An enrichment that is off, not trained yet, or fails on a model's rows
    gives NULLs there (never a made-up value), and its version column is NULL too;
    when it computed nothing for any model of the group its columns are not in
    the table at all (the insert leaves them NULL).
    """

    spec = parts[0][0].spec
    counts = [rows.num_rows for rows, _ in parts]
    n = sum(counts)
    own = spec_columns(spec)  # the same for every model of the group
    storage = {name: {o.name: o.storage for o in outs} for name, outs in model_outputs(spec)}
    outputs: dict[str, list[pa.Array]] = {}  # storage column -> one array per model
    for k, (rows, active) in enumerate(parts):
        batch = rows.batch()
        for name, act in active.items():
            if name not in storage:  # not one this model can use (its view has no such columns)
                continue
            started = time.perf_counter()
            try:
                out = checked_output(name, rows.spec, act.fitted.transform(batch), rows.num_rows)
            except Exception:  # noqa: BLE001 - whatever an enrichment does, the rows go on
                metrics.ENRICHMENT_ERRORS.labels(rows.spec.model_id, name).inc()
                log.exception("model %s: %s v%s failed on a batch of %d rows; its columns are NULL",
                              rows.spec.model_id, name, act.version, rows.num_rows)
                continue
            metrics.ENRICHMENT_SECONDS.labels(name).observe(time.perf_counter() - started)
            out[version_column(name)] = pa.array(np.full(rows.num_rows, act.version, np.uint32))
            for col, arr in out.items():
                outputs.setdefault(storage[name][col], [None] * len(parts))[k] = arr

    columns: dict[str, pa.Array] = {}
    for col, arrays in outputs.items():
        arrow_type = own[col][1]
        columns[col] = pa.concat_arrays([
            pa.nulls(counts[k], arrow_type) if a is None else (a if a.type == arrow_type else a.cast(arrow_type))
            for k, a in enumerate(arrays)])

    def joined(get) -> pa.Array:
        arrays = [get(rows) for rows, _ in parts]
        return arrays[0] if len(arrays) == 1 else pa.concat_arrays(arrays)

    model_ids = pa.array([rows.spec.model_id for rows, _ in parts])
    owner = np.repeat(np.arange(len(parts), dtype=np.int32), counts)
    columns["model_id"] = pa.DictionaryArray.from_arrays(owner, model_ids).cast(pa.string())
    columns["inference_id"] = joined(lambda r: r.inference_id)
    columns["timestamp"] = joined(lambda r: r.timestamp)
    slots = spec.storage_columns
    for c in spec.columns:  # each feature into its slot column (the models of one group share slots)
        columns[slots[c.name]] = joined(lambda r, name=c.name: r.values[name])
    suffix = "" if spec.prediction_type == "numeric" else "_class"
    columns["prediction" + suffix] = joined(lambda r: r.prediction)
    label = columns["label" + suffix] = joined(lambda r: r.label)
    # A label sent with its inference is as old as the inference: an update
    # that arrives later is newer, a redelivered copy of the inference is not.
    label_at = columns["timestamp"].cast(pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
    columns["label_at"] = pc.if_else(pc.is_valid(label), label_at, pa.scalar(None, label_at.type))
    columns["_ingested_at"] = columns["_written_at"] = pa.array(np.full(n, ingested_at_us, np.int64))
    columns["_partition"] = pa.array(np.concatenate([r.partition for r, _ in parts]), pa.uint32())
    columns["_offset"] = pa.array(np.concatenate([r.offset for r, _ in parts]), pa.uint64())

    # Only the columns something was computed for: an enrichment that is off (or
    # failed on the batch) is left out of the insert, and ClickHouse stores NULL
    # there, as for any column an insert does not name. Writing its NULLs
    # (explanations: a column per feature) costs as much as writing values.
    names = list(FIXED_COLUMNS) + list(slots.values()) + [c for c in own if c in outputs]
    arrays = []
    for col in names:
        arrow_type = (FIXED_COLUMNS.get(col) or own[col])[1]
        arr = columns.get(col)
        if arr is None:
            arr = pa.nulls(n, arrow_type)
        arrays.append(arr if arr.type == arrow_type else arr.cast(arrow_type))
    return pa.Table.from_arrays(arrays, names=names)


def storage_group(spec) -> tuple:
    """Models with the same group key are enriched into one table together (enrich_many):
    same inputs, same storage columns (slots and the enrichments' outputs)."""
    return spec.layout, tuple(spec.storage_columns.items()), tuple(spec_columns(spec))
