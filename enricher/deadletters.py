"""The dead-letter topic: how a rejected message is written, and read back.

The record's value is the original message, byte for byte, so it can be
replayed as it is once the cause is fixed. Why it was rejected travels in
headers: `enricher.reason` (a short code, see contract.REASONS),
`enricher.detail` (readable), `enricher.source` (topic/partition/offset),
where known `enricher.model_id`, and for a row of a batched message
`enricher.batch_index` (its position); such a row leaves alone, as a message
of its own in its batch's format, so the rest of the batch is not replayed.

A value larger than ENRICHER_DLQ_MAX_BYTES (the broker and its producer
refuse records past a limit, 1 MB by default) is cut to that size and
flagged: `enricher.truncated: 1`, `enricher.original_bytes` (its full
length) and `enricher.original_sha256`, so the message can still be found in
the source topic (`enricher.source`) and checked against the original.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .config import Settings
from .contract import DeadLetter
from .topics import read_topic


def record(d: DeadLetter, source_topic: str, max_bytes: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The dead letter's Kafka value and headers, its value cut to max_bytes if longer."""
    out = headers(d, source_topic)
    value = d.raw
    if len(value) > max_bytes:
        out += [("enricher.truncated", b"1"), ("enricher.original_bytes", str(len(value)).encode()),
                ("enricher.original_sha256", hashlib.sha256(value).hexdigest().encode())]
        value = value[:max_bytes]
    return value, out


def headers(d: DeadLetter, source_topic: str) -> list[tuple[str, bytes]]:
    out = [
        ("enricher.reason", d.reason.encode()),
        ("enricher.detail", d.detail.encode("utf-8", "replace")[:1000]),
        ("enricher.source", f"{source_topic}/{d.partition}/{d.offset}".encode()),
    ]
    if d.model_id is not None:
        out.append(("enricher.model_id", d.model_id.encode("utf-8", "replace")[:200]))
    if d.index is not None:
        out.append(("enricher.batch_index", str(d.index).encode()))
    return out


@dataclass
class DeadLetterRecord:
    value: bytes
    reason: str
    detail: str
    source: str
    model_id: str | None
    batch_index: int | None = None
    original_bytes: int | None = None  # set when the value was truncated
    original_sha256: str | None = None


def read(settings: Settings, expected: int, timeout: float = 30.0) -> list[DeadLetterRecord]:
    """Read the dead-letter topic from the start until `expected` records (or timeout)."""
    records = []
    for msg in read_topic(settings, settings.dlq_topic, expected, timeout):
        h = {k: v.decode("utf-8", "replace") for k, v in (msg.headers() or [])}
        index = h.get("enricher.batch_index")
        original = h.get("enricher.original_bytes")
        records.append(DeadLetterRecord(msg.value(), h.get("enricher.reason", ""), h.get("enricher.detail", ""),
                                        h.get("enricher.source", ""), h.get("enricher.model_id"),
                                        int(index) if index is not None else None,
                                        int(original) if original is not None else None,
                                        h.get("enricher.original_sha256")))
    return records
