"""Apply a model's serving artifacts to a validated batch -> the enriched Arrow table."""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from models.enrichment import FeatureBatch

from . import metrics
from .contract import ModelRows
from .serving import Active

log = logging.getLogger(__name__)


def enrich(rows: ModelRows, active: dict[str, Active], layout: dict[str, tuple[str, pa.DataType]],
           ingested_at_us: int) -> pa.Table:
    """The batch as the model's table wants it, enrichment columns filled.

    An enrichment that is off, not trained yet, or fails on this batch gives
    NULLs (never a made-up value), and its version column is NULL too.
    """
    n = rows.num_rows
    added: dict[str, pa.Array] = {}
    batch = FeatureBatch(rows.values, n)
    for name, act in active.items():
        started = time.perf_counter()
        try:
            out = act.fitted.transform(batch)
        except Exception:
            metrics.ENRICHMENT_ERRORS.labels(rows.spec.model_id, name).inc()
            log.exception("model %s: %s v%s failed on a batch of %d rows; its columns are NULL",
                          rows.spec.model_id, name, act.version, n)
            continue
        metrics.ENRICHMENT_SECONDS.labels(name).observe(time.perf_counter() - started)
        added.update(out)
        added[f"{name}_version"] = pa.array(np.full(n, act.version, np.uint32))

    arrays = []
    for col, (_, arrow_type) in layout.items():
        if col == "inference_id":
            arr = rows.inference_id
        elif col == "timestamp":
            arr = rows.timestamp
        elif col == "prediction":
            arr = rows.prediction
        elif col == "label":
            arr = rows.label
        elif col == "_ingested_at":
            arr = pa.array(np.full(n, ingested_at_us, np.int64)).cast(arrow_type)
        elif col == "_partition":
            arr = pa.array(rows.partition, pa.uint32())
        elif col == "_offset":
            arr = pa.array(rows.offset, pa.uint64())
        elif col in rows.values:
            arr = rows.values[col]
        elif col in added:
            arr = added[col]
        else:
            arr = pa.nulls(n, arrow_type)
        arrays.append(arr if arr.type == arrow_type else arr.cast(arrow_type))
    return pa.Table.from_arrays(arrays, names=list(layout))

