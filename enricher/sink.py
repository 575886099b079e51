"""The ClickHouse sink, after Quix Streams' sinks: one write per batch.

The worker acknowledges a batch's messages (so their offsets may be
committed) only after `write` returned: an offset is never committed ahead of
its rows. A failed write raises; the caller retries
the same batch.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa

from models.spec import ModelSpec

from . import metrics
from .clickhouse import EnrichedTables, connect
from .config import Settings


class ClickHouseSink:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._local = threading.local()

    @property
    def tables(self) -> EnrichedTables:
        # one connection per thread: clickhouse-connect clients are not shared across threads
        tables = getattr(self._local, "tables", None)
        if tables is None:
            tables = self._local.tables = EnrichedTables(connect(self.settings), self.settings.clickhouse_database)
        return tables

    def prepare(self, spec: ModelSpec) -> None:
        """Make sure the model's view exists (cheap once done)."""
        self.tables.ensure_view(spec)

    def write(self, table: pa.Table, rows_per_model: dict[str, int]) -> None:
        """One insert for the whole batch, every model's rows together."""
        started = time.perf_counter()
        try:
            self.tables.insert(table)
        except Exception:
            metrics.INSERT_FAILURES.inc()
            raise
        done = time.time()
        metrics.INSERT_SECONDS.observe(time.perf_counter() - started)
        for model_id, n in rows_per_model.items():
            metrics.INSERT_ROWS.labels(model_id).inc(n)
        ts = table.column("timestamp").cast(pa.int64()).to_numpy()
        metrics.observe_many(metrics.E2E_LATENCY, np.maximum(done - ts / 1000.0, 0.0))
