"""Late labels: ground truth that arrives after (or before) its inference.

A label update is a message on the inference topic with `model_id`,
`inference_id` and `label` and no `features` (contract.py; batched like
inferences). The worker writes each one to `<database>_store.labels`
(ReplacingMergeTree(label_at) by (model_id, inference_id): the latest per
inference), with `label_at` = when the worker took it. Nothing else happens
on the hot path.

A *sweep*, run every ENRICHER_LABEL_SWEEP_INTERVAL seconds by the worker that
holds partition 0 of the inference topic (one sweeper per consumer group),
brings labels to their rows. The storage table is a ReplacingMergeTree keyed
by (model_id, timestamp, inference_id) and versioned by _written_at, so
labelling a row is writing it again, label set, as a newer version; the view
(FINAL) shows that one, and merges drop the old. A label names no timestamp,
so the sweep looks its inference up (a bloom-filter index on inference_id
skips the granules that do not hold it). Each sweep runs two queries in
ClickHouse and inserts the rows they return (clickhouse.py says why rows are
rewritten rather than labelled by a row of their own):

1. labels that arrived since the last sweep whose inference is stored;
2. inferences ingested since the last sweep that have a label: one that
   arrived before them (kept in the labels table, for as long as it keeps
   rows: ENRICHER_RETENTION_DAYS, by default for good), or one a redelivered
   copy of the inference has just written over.

Either writes the latest label unless the row already shows it: the guard
compares with what the view shows now (FINAL), so a sweep run twice writes
nothing new, and an older label never replaces a newer one.

"Since the last sweep" is measured on the workers' clocks (label_at,
_ingested_at) with a margin (SWEEP_OVERLAP_S) for clock skew and inserts in
flight; a sweep that fails leaves the watermark where it was, so the next one
covers its window again. Watermarks are kept in `<database>_store.label_sweeps`,
so a restarted or new sweeper goes on where the last one stopped.

Latest wins: by label_at. A label sent with its inference has label_at = the
inference's timestamp, so any later update wins over it, and a redelivered
copy of the inference does not win over an update.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from enricher import metrics
from enricher.store.clickhouse import LABEL_SWEEPS, TABLE, EnrichedTables, quote, store_table

log = logging.getLogger(__name__)

SWEEP_OVERLAP_S = 60.0
LABEL_AT = pa.timestamp("us", tz="UTC")


@dataclass
class SweepResult:
    applied: int  # label rows written to the storage table
    pending: int  # labels of this sweep's window whose inference is not stored yet
    seconds: float


def label_table(parts: list[tuple[str, pa.Array, pa.Array, bool]], label_at_us: int) -> pa.Table:
    """A batch's label updates, (model_id, inference ids, labels, numeric?) per
    model, as the labels table wants them. They share one label_at, so within
    the batch the last one per inference is the one kept."""
    tables = []
    for model_id, ids, labels, numeric in parts:
        n = len(ids)
        tables.append(pa.table({
            "model_id": pa.array([model_id] * n, pa.string()), "inference_id": ids,
            "label": labels.cast(pa.float64()) if numeric else pa.nulls(n, pa.float64()),
            "label_class": pa.nulls(n, pa.string()) if numeric else labels.cast(pa.string())}))
    table = pa.concat_tables(tables)
    if table.num_rows > 1:
        order = table.append_column("_i", pa.array(np.arange(table.num_rows)))
        last = order.group_by(["model_id", "inference_id"], use_threads=False).aggregate([("_i", "max")])
        table = table.take(np.sort(last.column("_i_max").to_numpy()))
    return table.append_column("label_at", pa.array(np.full(table.num_rows, label_at_us, np.int64)).cast(LABEL_AT))


class LabelSweep:
    """Brings label updates to their rows; see the module doc."""

    def __init__(self, tables: EnrichedTables, overlap_s: float = SWEEP_OVERLAP_S):
        self.tables = tables
        self.overlap_us = int(overlap_s * 1e6)
        self.sweeps = store_table(tables.database, LABEL_SWEEPS)
        self.watermark_us: int | None = None

    def _start_watermark(self) -> int:
        c = self.tables.client
        last = c.query(f"SELECT toUnixTimestamp64Micro(max(started_at)), count() FROM {self.sweeps}").result_rows[0]
        if last[1]:
            return int(last[0])
        first = c.query(f"SELECT toUnixTimestamp64Micro(min(label_at)), count() FROM {self.tables.labels}"
                        ).result_rows[0]
        # Never swept: from the first label there is (nothing before it can need one).
        return int(first[0]) - 1 if first[1] else int(time.time() * 1e6)

    def run(self, now_us: int | None = None) -> SweepResult:
        started = time.perf_counter()
        self.tables.ensure_table()
        now_us = int(time.time() * 1e6) if now_us is None else now_us
        if self.watermark_us is None:
            self.watermark_us = self._start_watermark()
        since = f"fromUnixTimestamp64Micro({self.watermark_us - self.overlap_us}, 'UTC')"
        t, c = self.tables, self.tables.client
        # The rows as the view shows them now (FINAL: the last written version).
        shown = f"SELECT * FROM {t.table} FINAL WHERE {{where}}"
        # (Aliases differ from the columns: in ClickHouse an alias would stand
        # for the column in WHERE.)
        latest = ("SELECT model_id, inference_id, argMax(label, label_at) AS latest, "
                  "argMax(label_class, label_at) AS latest_class, max(label_at) AS latest_at "
                  f"FROM {t.labels} WHERE {{where}} GROUP BY model_id, inference_id")
        arrived = f"SELECT inference_id FROM {t.labels} WHERE label_at > {since}"
        ingested = f"SELECT inference_id FROM {t.table} WHERE _ingested_at > {since}"
        settings = {"use_skip_indexes_if_final": 1, "do_not_merge_across_partitions_select_final": 1,
                    "join_use_nulls": 1}
        # The whole row again, with the label, as a newer version of it.
        own = {"label": "l.latest", "label_class": "l.latest_class", "label_at": "l.latest_at",
               "_written_at": f"fromUnixTimestamp64Micro({now_us}, 'UTC')"}
        # Every column the table has now: another worker may have added a
        # model's slot columns since this one looked, and a copy without them
        # would lose that model's features.
        present = [r[0] for r in c.query(
            "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String} ORDER BY position",
            parameters={"db": t.store, "t": TABLE}).result_rows]
        columns = ", ".join(f"{own.get(name, 'e.' + quote(name))} AS {quote(name)}" for name in present)
        pick = (f"SELECT {columns}, e.inference_id IS NULL AS _unseen FROM ({{labels}}) AS l "
                "LEFT JOIN ({rows}) AS e ON e.model_id = l.model_id AND e.inference_id = l.inference_id "
                "WHERE e.inference_id IS NULL OR e.label_at IS NULL OR e.label_at < l.latest_at")
        # 1. labels that arrived since the last sweep; 2. rows ingested since then
        # that have a label (arrived earlier, or written over by a redelivered copy).
        found = [c.query_arrow(pick.format(labels=latest.format(where=f"label_at > {since}"),
                                           rows=shown.format(where=f"inference_id IN ({arrived})")),
                               settings=settings),
                 c.query_arrow(pick.format(labels=latest.format(where=f"inference_id IN ({ingested})"),
                                           rows=shown.format(where=f"_ingested_at > {since}")),
                               settings=settings)]
        pending = pc.sum(found[0].column("_unseen").cast(pa.int64())).as_py() or 0
        rows = pa.concat_tables(found)
        rows = rows.filter(pc.invert(rows.column("_unseen").cast(pa.bool_()))).drop_columns(["_unseen"])
        if rows.num_rows:
            # a label found by both queries is written once
            rows = rows.take(np.sort(rows.append_column("_i", pa.array(np.arange(rows.num_rows))).group_by(
                ["model_id", "inference_id"], use_threads=False).aggregate([("_i", "min")]).column("_i_min")
                .to_numpy()))
            c.insert_arrow(t.table, rows, settings={"insert_deduplicate": 0})
        c.command(f"INSERT INTO {self.sweeps} VALUES (fromUnixTimestamp64Micro({now_us}, 'UTC'), "
                  f"{rows.num_rows}, {pending})")
        self.watermark_us = now_us
        return SweepResult(rows.num_rows, pending, time.perf_counter() - started)


class LabelSweeper:
    """Runs the label sweep in a thread of its own (one ClickHouse connection,
    off the event loop); a failed sweep is logged and tried at the next tick,
    over the same window."""

    def __init__(self, sink):
        self.sink = sink  # sink.ClickHouseSink: its tables, and a new connection after a failure
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="label-sweep")
        self.sweep: LabelSweep | None = None

    def run(self) -> None:
        try:
            if self.sweep is None:
                self.sweep = LabelSweep(self.sink.tables)
            result = self.sweep.run()
        except Exception as exc:  # noqa: BLE001 - a store that is down, a bug: the next sweep covers this window
            metrics.LABEL_SWEEP_FAILURES.inc()
            log.warning("label sweep failed (%s: %s); the next one covers its window", type(exc).__name__,
                        str(exc)[:300])
            # A new connection next time, and the watermark of the last sweep that
            # succeeded, as the label_sweeps table has it.
            self.sink.forget_connection()
            self.sweep = None
            return
        metrics.LABEL_SWEEP_SECONDS.observe(result.seconds)
        metrics.LABELS_APPLIED.inc(result.applied)
        metrics.LABELS_PENDING.inc(result.pending)
        if result.applied or result.pending:
            log.info("label sweep: %d labels brought to their rows, %d waiting for their inference (%.3fs)",
                     result.applied, result.pending, result.seconds)
