"""The labelled rows of a recent window, read from the enriched tables for training.

An enrichment that learns from the stream (hotspots: where the model is wrong
*now*) trains on its reference data plus these rows (`StreamTraining` in
models/enrichment.py says which window and how many). They are read like any
analyst's query, through `enricher.store.query.ask`: straight from a
ClickHouse server, or through the running worker that holds the embedded
store; under the same guard and limits, reading the model's view and nothing
else. So a training pod needs no more rights than a dashboard.

Sampling: the rows of the window whose label has arrived, ordered by
`cityHash64(inference_id)` and cut at `max_rows`. The hash is a uniform draw
that knows nothing of features, time or outcome, so the sample is a fair one
of the window however many rows it holds, and the same rows are drawn again
for the same window (a retried step trains on what the failed one read).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pyarrow as pa
from enricher.models.enrichment import FROM_STREAM, StreamTraining
from enricher.models.spec import ModelSpec

from enricher.config import Settings
from enricher.errors import UserError
from enricher.store.clickhouse import quote
from enricher.store.query import ask

log = logging.getLogger("enricher.pipeline")


@dataclass(frozen=True)
class Drawn:
    table: pa.Table | None   # features, prediction, label in the reference data's types; None: no rows
    rows: int
    start: float
    end: float
    note: str                # what was read, for the run's log and the manifest

    def record(self) -> dict:
        return {"stream_rows": self.rows, "stream_from": _iso(self.start), "stream_to": _iso(self.end),
                "stream_note": self.note}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def sql(spec: ModelSpec, training: StreamTraining, start: float, end: float) -> str:
    """The query that draws the sample (one model's view; its features, prediction and label)."""
    columns = ", ".join(quote(c.name) for c in spec.features) + ", prediction, label"
    return (f"SELECT {columns} FROM {quote(spec.model_id)} "
            f"WHERE label IS NOT NULL "
            f"AND timestamp >= toDateTime64({float(start)!r}, 3, 'UTC') "
            f"AND timestamp < toDateTime64({float(end)!r}, 3, 'UTC') "
            f"ORDER BY cityHash64(inference_id) LIMIT {int(training.max_rows)}")


class LabelledRows:
    """Reads a model's labelled rows of a recent window from the store of `settings`."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def draw(self, spec: ModelSpec, training: StreamTraining, now: float | None = None) -> Drawn:
        end = time.time() if now is None else now
        start = end - training.window
        if training.max_rows <= 0:
            return Drawn(None, 0, start, end, "the stream is not read (stream_rows is 0)")
        try:
            answer = ask(self.settings, sql(spec, training, start, end))
        except UserError as exc:
            if "UNKNOWN_TABLE" in str(exc) or "Unknown table" in str(exc):
                # the view is made when the worker first serves the model: no rows yet
                return Drawn(None, 0, start, end, "no enriched rows yet (the model has no view)")
            raise
        rows = answer.rows
        if not rows:
            return Drawn(None, 0, start, end, "no labelled rows in the window")
        names = answer.columns
        table = pa.table({name: pa.array([r[i] for r in rows], _arrow(spec, name))
                          for i, name in enumerate(names)})
        note = f"{len(rows)} labelled rows of the window, sampled by a hash of inference_id"
        if answer.truncated:  # the query row cap (ENRICHER_QUERY_MAX_ROWS) is below stream_rows
            note += f" (cut at the query row cap, {answer.row_limit})"
        log.info("%s: %s", spec.model_id, note)
        return Drawn(table, len(rows), start, end, note)


def _arrow(spec: ModelSpec, name: str) -> pa.DataType:
    if name in ("prediction", "label"):
        return pa.float64() if spec.prediction_type == "numeric" else pa.string()
    column = next(c for c in spec.columns if c.name == name)
    return pa.float64() if column.numeric else pa.string()


def combined(reference: pa.Table, drawn: Drawn) -> pa.Table:
    """The (normalised) reference data's features, prediction and label, then the drawn
    rows, each marked in FROM_STREAM (the enrichment decides what each side weighs)."""
    if drawn.table is None:
        return reference
    head = reference.select(drawn.table.column_names)
    both = pa.concat_tables([head, drawn.table.cast(head.schema)])
    marks = pa.array([False] * head.num_rows + [True] * drawn.table.num_rows, pa.bool_())
    return both.append_column(FROM_STREAM, marks)
