"""One batch through the engine, with no Kafka in sight: parse -> enrich -> write.

The Faust agent hands raw messages here; tests and benchmarks call it directly.

`handle` deals with every failure but one, so that no message can stop the
stream behind it:
- a message or row the contract refuses is a dead letter (contract.py);
- an enrichment that fails on a batch leaves its columns NULL (enrich.py);
- a batch the store refuses for a reason a retry will not change
  (`StoreRejected`) is split until the rows at fault are found: they are
  dead-lettered `store_rejected` with the store's message, the rest is
  written. A schema mismatch fails every row alike, so its batch is
  dead-lettered whole at once, the message naming the table and the column;
- anything else is a bug: it is logged with the batch's offsets, and the
  batch is bisected down to the message that triggers it, which is
  dead-lettered `internal_error`; the rest goes on.
The one failure left to the caller is `StoreUnavailable` (the store cannot
take the batch now): the caller retries the same messages later, and
everything here is safe to run again on them (see `write`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from enricher import metrics
from enricher.config import Settings
from enricher.store.labels import label_table
from enricher.store.rows import storage_group
from enricher.store.sink import ClickHouseSink, StoreRejected, StoreUnavailable
from enricher.stream.contract import DeadLetter, ParsedBatch, joined, parse_batch
from enricher.stream.enrich import enrich_many
from enricher.stream.serving import Serving

log = logging.getLogger(__name__)

# Inserts one rejected batch may take to find its bad rows (a few per bad row,
# log2 of the batch each); past that, what is still unresolved is
# dead-lettered as it stands rather than hold the stream.
MAX_SPLIT_INSERTS = 256


@dataclass
class Outcome:
    """What became of a batch's messages: rows stored per model, and dead letters to send."""

    written: Counter = field(default_factory=Counter)
    dead: list[DeadLetter] = field(default_factory=list)
    messages: int = 0
    labels: Counter = field(default_factory=Counter)  # label updates taken, per model

    def add(self, other: "Outcome") -> "Outcome":
        self.written.update(other.written)
        self.labels.update(other.labels)
        self.dead.extend(other.dead)
        self.messages += other.messages
        return self


@dataclass
class Messages:
    """A batch's raw messages, column by column (what the agent hands over)."""

    values: list[bytes]
    partitions: list[int]
    offsets: list[int]
    content_types: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.values)

    def halves(self) -> tuple["Messages", "Messages"]:
        h = len(self) // 2
        ct = self.content_types
        return (Messages(self.values[:h], self.partitions[:h], self.offsets[:h], ct[:h] if ct else None),
                Messages(self.values[h:], self.partitions[h:], self.offsets[h:], ct[h:] if ct else None))

    def token(self, topic: str) -> str:
        """The batch's insert deduplication token: its topic, each partition's
        offsets, and a digest of the values (a topic deleted and made again
        reuses offsets; the digest keeps its new rows from passing for old ones)."""
        spans = ",".join(f"{p}:{lo}-{hi}" for p, (lo, hi) in sorted(self._spans().items()))
        # (a tombstone's value is None: it counts as empty, as parse_batch reads it)
        digest = hashlib.blake2b(b"\0".join(v or b"" for v in self.values), digest_size=16).hexdigest()
        return f"{topic}|{spans}|{len(self)}|{digest}"

    def _spans(self) -> dict[int, tuple[int, int]]:
        """Each partition's lowest and highest offset, per partition in one numpy pass
        (this runs for every batch: no Python loop over its messages)."""
        if not len(self):
            return {}
        partitions = np.asarray(self.partitions, np.int64)
        offsets = np.asarray(self.offsets, np.int64)
        order = np.lexsort((offsets, partitions))
        partitions, offsets = partitions[order], offsets[order]
        starts = np.flatnonzero(np.r_[True, partitions[1:] != partitions[:-1]])
        ends = np.r_[starts[1:], len(partitions)] - 1
        return {int(partitions[a]): (int(offsets[a]), int(offsets[b])) for a, b in zip(starts, ends)}

    def where(self) -> str:
        return ", ".join(f"partition {p} offsets {lo}-{hi}" for p, (lo, hi) in sorted(self._spans().items()))


class BatchProcessor:
    def __init__(self, settings: Settings, serving: Serving, sink: ClickHouseSink):
        self.settings = settings
        self.serving = serving
        self.sink = sink

    def handle(self, messages: Messages) -> Outcome:
        """Parse, enrich and store a batch; raises StoreUnavailable only (see module doc)."""
        try:
            outcome = self._store(self.parse(messages), messages.token(self.settings.inference_topic))
        except StoreUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: find the message that triggers it
            metrics.INTERNAL_ERRORS.inc()
            log.exception("batch of %d message(s) at %s failed (a bug)%s", len(messages), messages.where(),
                          "; bisecting it" if len(messages) > 1 else "; dead-lettering the message")
            if len(messages) == 1:
                return Outcome(dead=[DeadLetter(messages.values[0], "internal_error",
                                                f"{type(exc).__name__}: {exc}", None,
                                                messages.partitions[0], messages.offsets[0])], messages=1)
            first, second = messages.halves()
            return self.handle(first).add(self.handle(second))
        outcome.messages = len(messages)
        return outcome

    def parse(self, messages: Messages) -> ParsedBatch:
        return parse_batch(messages.values, messages.partitions, messages.offsets, self.serving.spec,
                           self.settings.max_message_bytes, messages.content_types, self.settings.max_future_skew)

    def enrich(self, parsed: ParsedBatch, ingested_at_us: int | None = None) -> tuple[pa.Table, np.ndarray]:
        """Every model's rows in the storage layout, and each row's origin in the batch."""
        if ingested_at_us is None:
            ingested_at_us = time.time_ns() // 1000
        groups: dict[int, list] = {}
        for model_id, rows in parsed.models.items():
            groups.setdefault(storage_group(rows.spec), []).append((rows, self.serving.active(model_id)))
        tables = [enrich_many(parts, ingested_at_us) for parts in groups.values()]
        origin = joined([rows for parts in groups.values() for rows, _ in parts], lambda r: r.origin)
        # Groups use different slot columns: the one insert has them all, NULL where unused.
        return (tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")), origin

    def _store(self, parsed: ParsedBatch, token: str | None = None) -> Outcome:
        """Enrich and insert every model's rows.

        Safe to call again with the same batch after a failure: the insert
        carries the batch's token, so a store that took it the first time
        takes nothing the second; without a token (or past the store's
        deduplication window) the rows are written again, and the view shows
        them once.
        """
        outcome = Outcome(dead=list(parsed.dead))
        if parsed.models:
            self._store_inferences(parsed, token, outcome)
        if parsed.labels:
            self._store_labels(parsed, token, outcome)
        return outcome

    def _store_inferences(self, parsed: ParsedBatch, token: str | None, outcome: Outcome) -> None:
        try:
            self.sink.prepare([rows.spec for rows in parsed.models.values()])
        except StoreRejected as exc:  # the store refuses our DDL: no row of these models can be written
            origin = np.concatenate([rows.origin for rows in parsed.models.values()])
            models = [m for m, rows in parsed.models.items() for _ in range(rows.num_rows)]
            outcome.dead += [parsed.dead_letter(o, "store_rejected", f"{exc.table}: {exc}", m)
                             for o, m in zip(origin.tolist(), models)]
            return
        table, origin = self.enrich(parsed)
        written = Counter({m: rows.num_rows for m, rows in parsed.models.items()})
        try:
            self.sink.write(table, written, token)
        except StoreRejected as exc:
            stored, dead = self._split(table, origin, parsed, exc, token)
            outcome.written.update(stored)
            outcome.dead += dead
            return
        outcome.written.update(written)

    def _store_labels(self, parsed: ParsedBatch, token: str | None, outcome: Outcome) -> None:
        """The batch's label updates, in one insert to the labels table (labels.py
        brings them to their rows). Validated already: a refusal here is the
        store's, for all of them alike."""
        table = label_table([(m, r.inference_id, r.label, r.spec.prediction_type == "numeric")
                             for m, r in parsed.labels.items()], time.time_ns() // 1000)
        try:
            self.sink.write_labels(table, token and f"{token}|labels")
        except StoreRejected as exc:
            outcome.dead += [parsed.dead_letter(o, "store_rejected", f"{exc.table}: {exc}", m)
                             for m, r in parsed.labels.items() for o in r.origin.tolist()]
            return
        outcome.labels.update({m: r.num_rows for m, r in parsed.labels.items()})

    def _split(self, table: pa.Table, origin: np.ndarray, parsed: ParsedBatch,
               rejected: StoreRejected, token: str | None = None) -> tuple[Counter, list[DeadLetter]]:
        """Halve the refused batch until the refused rows stand alone; write the rest."""
        log.warning("the store refused a batch of %d rows (%s); finding the rows at fault", table.num_rows,
                    rejected)
        stored, dead = Counter(), []

        def give_up(start: int, length: int, error: StoreRejected) -> None:
            models = table.column("model_id").slice(start, length).to_pylist()
            detail = f"{error.table}: {error}"
            for o, m in zip(origin[start:start + length].tolist(), models):
                dead.append(parsed.dead_letter(o, "store_rejected", detail, m))

        if rejected.schema:  # every row alike: no split (see module doc)
            give_up(0, table.num_rows, rejected)
            return stored, dead
        pending, inserts = [(0, table.num_rows, rejected)], 0
        while pending:
            start, length, error = pending.pop()
            if length == 1 or inserts >= MAX_SPLIT_INSERTS:
                give_up(start, length, error)
                continue
            half = length // 2
            for s, n in ((start, half), (start + half, length - half)):
                piece = table.slice(s, n)
                counts = Counter(dict(zip(*[c.to_pylist() for c in
                                           pc.value_counts(piece.column("model_id")).flatten()])))
                inserts += 1
                try:
                    self.sink.write(piece, counts, token and f"{token}|rows {s}+{n}")
                except StoreRejected as exc:
                    pending.append((s, n, exc))
                else:
                    stored.update(counts)
        return stored, dead

    def count(self, outcome: Outcome) -> None:
        consumed = Counter(outcome.written)
        for d in outcome.dead:
            # Unregistered ids are counted under "": a producer sending random
            # ids must not make a Prometheus series each.
            model = "" if d.reason == "unknown_model" or d.model_id is None else d.model_id
            consumed[model] += 1
            metrics.DEAD_LETTERED.labels(model, d.reason).inc()
        for model_id, n in consumed.items():
            metrics.CONSUMED.labels(model_id).inc(n)
        for model_id, n in outcome.written.items():
            metrics.ENRICHED.labels(model_id).inc(n)
        for model_id, n in outcome.labels.items():
            metrics.LABELS_RECEIVED.labels(model_id).inc(n)
        metrics.BATCH_MESSAGES.observe(outcome.messages)
        metrics.BATCH_ROWS.observe(sum(consumed.values()))
