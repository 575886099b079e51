"""Apply a model's serving artifacts to a validated batch; the rows in the storage layout come from store/rows.py."""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from enricher import metrics
from enricher.models.catalog import checked_output, model_outputs
from enricher.models.enrichment import version_column
from enricher.store.rows import storage_rows
from enricher.stream.contract import ModelRows
from enricher.stream.serving import Active

log = logging.getLogger(__name__)


def enrich(rows: ModelRows, active: dict[str, Active], ingested_at_us: int) -> pa.Table:
    """One model's batch as the storage table wants it, enrichment columns filled."""
    return enrich_many([(rows, active)], ingested_at_us)


def enrich_many(parts: list[tuple[ModelRows, dict[str, Active]]], ingested_at_us: int) -> pa.Table:
    """Batches of models that share one layout and slots (`storage_group`), as one storage-layout table.

    Each model's enrichments run on that model's rows; everything else (the
    slot columns, ids, casts: store/rows.py) is built once for all of them, so
    a batch spread over many models pays those costs once, not once per model.

    An enrichment that is off, not trained yet, or fails on a model's rows
    gives NULLs there (never a made-up value), and its version column is NULL too;
    when it computed nothing for any model of the group its columns are not in
    the table at all (the insert leaves them NULL).
    """
    return storage_rows([rows for rows, _ in parts], enrichment_outputs(parts), ingested_at_us)


def enrichment_outputs(parts: list[tuple[ModelRows, dict[str, Active]]]) -> dict[str, list[pa.Array | None]]:
    """What each model's serving enrichments compute on its rows: storage column -> one
    array per part (None where that model's enrichment did not compute it)."""
    spec = parts[0][0].spec
    storage = {name: {o.name: o.storage for o in outs} for name, outs in model_outputs(spec)}
    outputs: dict[str, list[pa.Array | None]] = {}
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
            nulls = next(iter(out.values())).null_count if out else 0
            if nulls:
                metrics.ENRICHMENT_NULLS.labels(rows.spec.model_id, name).inc(nulls)
            out[version_column(name)] = pa.array(np.full(rows.num_rows, act.version, np.uint32))
            for col, arr in out.items():
                outputs.setdefault(storage[name][col], [None] * len(parts))[k] = arr
    return outputs
