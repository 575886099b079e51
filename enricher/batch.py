"""One batch through the engine, with no Kafka in sight: parse -> enrich -> write.

The Faust agent hands raw messages here; tests and benchmarks call it directly.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from . import metrics
from .config import Settings
from .contract import ParsedBatch, parse_batch
from .enrich import enrich_many
from .serving import Serving
from .sink import ClickHouseSink


@dataclass
class BatchResult:
    parsed: ParsedBatch
    written: dict[str, int]


class BatchProcessor:
    def __init__(self, settings: Settings, serving: Serving, sink: ClickHouseSink):
        self.settings = settings
        self.serving = serving
        self.sink = sink

    def parse(self, values: list[bytes], partitions: list[int], offsets: list[int],
              content_types: list[str | None] | None = None) -> ParsedBatch:
        parsed = parse_batch(values, partitions, offsets, self.serving.spec, self.settings.max_message_bytes,
                             content_types)
        per_model = Counter({m: rows.num_rows for m, rows in parsed.models.items()})
        per_model.update(d.model_id or "" for d in parsed.dead)
        for model_id, n in per_model.items():
            metrics.CONSUMED.labels(model_id).inc(n)
        metrics.BATCH_ROWS.observe(len(values))
        return parsed

    def write(self, parsed: ParsedBatch) -> dict[str, int]:
        """Enrich and insert every model's rows; raises if any insert fails.

        Safe to call again with the same batch after a failure: rows already
        written are written again and the table's view shows them once.
        """
        ingested_at = time.time_ns() // 1000
        written, groups = {}, {}
        for model_id, rows in parsed.models.items():
            self.sink.prepare(rows.spec)
            groups.setdefault(rows.spec.layout, []).append((rows, self.serving.active(model_id)))
            written[model_id] = rows.num_rows
        tables = [enrich_many(parts, ingested_at) for parts in groups.values()]
        if tables:
            self.sink.write(tables[0] if len(tables) == 1 else pa.concat_tables(tables), written)
        return written

    def count(self, parsed: ParsedBatch, written: dict[str, int]) -> None:
        for model_id, n in written.items():
            metrics.ENRICHED.labels(model_id).inc(n)
        for d in parsed.dead:
            metrics.DEAD_LETTERED.labels(d.model_id or "", d.reason).inc()

    def process(self, values, partitions, offsets, content_types=None) -> BatchResult:
        parsed = self.parse(values, partitions, offsets, content_types)
        written = self.write(parsed)
        self.count(parsed, written)
        return BatchResult(parsed, written)
