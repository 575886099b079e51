"""Apply a model's serving artifacts to a validated batch; the rows in the storage layout come from store/rows.py."""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from enricher import metrics
from enricher.models.catalog import checked_output, model_outputs
from enricher.models.enrichment import InferenceBatch, version_column
from enricher.store.rows import storage_rows
from enricher.stream.contract import Joined, ModelRows
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


# An enrichment's output over consecutive parts of a group: (first part, number of
# parts, the array over their rows, in order). A pool computes all its models at once,
# and its models' parts are mostly consecutive: its output stays whole (cut only where
# its run of parts breaks), not sliced per model to be joined again (store/rows.py).
Span = tuple[int, int, pa.Array]


def enrichment_outputs(parts: list[tuple[ModelRows, dict[str, Active]]]) -> dict[str, list[Span]]:
    """What each model's serving enrichments compute on its rows: storage column -> spans
    of parts (`Span`); a part no span covers gets NULL (its enrichment did not compute it).

    Artifacts held in a pool (serving.py `maintain`) are applied to the rows of all
    their models at once, one call per pool; the others, and any model of a pool
    that fails, each on its own rows."""
    spec = parts[0][0].spec
    storage = {name: {o.name: o.storage for o in outs} for name, outs in model_outputs(spec)}
    outputs: dict[str, list[Span]] = {}

    def put(k: int, m: int, name: str, out: dict[str, pa.Array]) -> None:
        for col, arr in out.items():
            outputs.setdefault(storage[name][col], []).append((k, m, arr))

    pools: dict[tuple[str, int], list[int]] = {}
    for k, (rows, active) in enumerate(parts):
        for name, act in active.items():
            if name not in storage:  # not one this model can use (its view has no such columns)
                continue
            if act.pooled is not None and rows.num_rows:
                pools.setdefault((name, id(act.pooled[0])), []).append(k)
                continue
            out = _apply(name, rows, act)
            if out is not None:
                put(k, 1, name, out)
    for (name, _), ks in pools.items():
        acts = [parts[k][1][name] for k in ks]
        out = _apply_pooled(name, [parts[k][0] for k in ks], acts)
        if out is None:  # each model on its own then, so a failure stays its own
            for k, act in zip(ks, acts):
                own = _apply(name, parts[k][0], act)
                if own is not None:
                    put(k, 1, name, own)
            continue
        # the pool's rows, cut where its parts stop being consecutive
        at = first = 0
        for i in range(1, len(ks) + 1):
            if i == len(ks) or ks[i] != ks[i - 1] + 1:
                n = sum(parts[k][0].num_rows for k in ks[first:i])
                put(ks[first], i - first, name, out if i - first == len(ks) else
                    {col: arr.slice(at, n) for col, arr in out.items()})
                at, first = at + n, i
    return outputs


def _apply(name: str, rows: ModelRows, act: Active) -> dict[str, pa.Array] | None:
    """One model's enrichment on its rows, checked, with its version column (as
    `_apply_pooled` gives it); None (and counted) if it failed."""
    started = time.perf_counter()
    try:
        out = checked_output(name, rows.spec, act.fitted.transform(rows.batch()), rows.num_rows)
    except Exception:  # noqa: BLE001 - whatever an enrichment does, the rows go on
        metrics.ENRICHMENT_ERRORS.labels(rows.spec.model_id, name).inc()
        log.exception("model %s: %s v%s failed on a batch of %d rows; its columns are NULL",
                      rows.spec.model_id, name, act.version, rows.num_rows)
        return None
    metrics.ENRICHMENT_SECONDS.labels(name).observe(time.perf_counter() - started)
    nulls = next(iter(out.values())).null_count if out else 0
    if nulls:
        metrics.ENRICHMENT_NULLS.labels(rows.spec.model_id, name).inc(nulls)
    out.setdefault(version_column(name), pa.array(np.full(rows.num_rows, act.version, np.uint32)))
    return out


def pooled_batch(parts: list[ModelRows], features: list[str]) -> InferenceBatch:
    """The rows of several models (of one layout) as one batch, for a pool: its columns only
    `features`, its spec the first model's (a pool reads each row's model from its member)."""
    joined = Joined(parts)
    return InferenceBatch(parts[0].spec, {f: joined(lambda r, f=f: r.values[f]) for f in features},
                          sum(rows.num_rows for rows in parts),
                          prediction=joined(lambda r: r.prediction), label=joined(lambda r: r.label),
                          inference_id=joined(lambda r: r.inference_id), timestamp=joined(lambda r: r.timestamp))


def _apply_pooled(name: str, parts: list[ModelRows], acts: list[Active]) -> dict[str, pa.Array] | None:
    """Several models' rows through one pool (every act of the same pool), their outputs one
    after the other, version column included; None if the pool failed (the caller applies
    each model on its own)."""
    pool = acts[0].pooled[0]
    counts = [rows.num_rows for rows in parts]
    total = sum(counts)
    started = time.perf_counter()
    try:
        member = np.repeat(np.array([act.pooled[1] for act in acts], np.intp), counts)
        out = checked_output(name, parts[0].spec, pool.transform(pooled_batch(parts, pool.features), member), total)
    except Exception:  # noqa: BLE001 - each model on its own then, so a failure stays its own
        log.exception("%s: a pool of %d models failed on %d rows; each model is applied on its own",
                      name, len(parts), total)
        return None
    metrics.ENRICHMENT_SECONDS.labels(name).observe(time.perf_counter() - started)
    out[version_column(name)] = pa.array(np.repeat(np.array([act.version for act in acts], np.uint32), counts))
    first = next(iter(out.values()))
    if first.null_count:  # counted per model, as _apply counts them
        missing = np.add.reduceat(first.is_null().to_numpy(zero_copy_only=False).astype(np.int64),
                                  np.cumsum([0] + counts[:-1]))
        for rows, nulls in zip(parts, missing.tolist()):
            if nulls:
                metrics.ENRICHMENT_NULLS.labels(rows.spec.model_id, name).inc(nulls)
    return out
