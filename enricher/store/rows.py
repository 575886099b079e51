"""A batch as rows of the storage table (clickhouse.py has the layout).

The stream hands over each model's parsed rows and what its enrichments
computed (stream/enrich.py); this builds the one Arrow table the sink inserts:
ids and timestamps, each feature in its slot column, prediction and label in
the numeric or the class columns, the bookkeeping columns, and the enrichment
columns with the types their storage columns have. Everything is columnar and
built once per group of models that share a layout (`storage_group`), not
once per model.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from enricher.store.clickhouse import FIXED_COLUMNS, spec_columns
from enricher.stream.contract import Joined


def storage_group(spec) -> int:
    """`group_key` as a small number (equal keys, equal numbers), remembered per spec object
    (specs are immutable; called per model and batch, where hashing the key would cost)."""
    known = _GROUPS.get(id(spec))
    if known is None or known[0] is not spec:
        if len(_GROUPS) > 100_000:
            _GROUPS.clear()
        key = group_key(spec)
        known = _GROUPS[id(spec)] = (spec, _GROUP_IDS.setdefault(key, len(_GROUP_IDS)))
    return known[1]


_GROUPS: dict[int, tuple] = {}
_GROUP_IDS: dict[tuple, int] = {}


def group_key(spec) -> tuple:
    """Models with the same group key are enriched into one table together (enrich_many):
    same inputs, same storage columns (slots and the enrichments' outputs)."""
    return spec.layout, tuple(spec.storage_columns.items()), tuple(spec_columns(spec))


def storage_rows(parts: list, outputs: dict[str, list[tuple[int, int, pa.Array]]], ingested_at_us: int) -> pa.Table:
    """The rows of `parts` (stream/contract.py ModelRows of one storage group, each a model's
    batch) with the enrichment `outputs` (storage column -> spans: first part, number of
    parts, the array over their rows; NULL where no span covers a part), as the storage
    table's insert."""
    spec = parts[0].spec
    counts = [rows.num_rows for rows in parts]
    n = sum(counts)
    own = spec_columns(spec)  # the same for every model of the group

    columns: dict[str, pa.Array] = {}
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()  # row where each part begins
    for col, spans in outputs.items():
        arrow_type = own[col][1]
        arrays, at = [], 0
        for k, m, arr in sorted(spans, key=lambda span: span[0]):
            if starts[k] > starts[at]:
                arrays.append(pa.nulls(starts[k] - starts[at], arrow_type))
            arrays.append(arr if arr.type == arrow_type else arr.cast(arrow_type))
            at = k + m
        if starts[at] < n:
            arrays.append(pa.nulls(n - starts[at], arrow_type))
        columns[col] = arrays[0] if len(arrays) == 1 else pa.concat_arrays(arrays)

    joined = Joined(parts)
    model_ids = pa.array([rows.spec.model_id for rows in parts])
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
    columns["_partition"] = pa.array(joined(lambda r: r.partition), pa.uint32())
    columns["_offset"] = pa.array(joined(lambda r: r.offset), pa.uint64())

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
