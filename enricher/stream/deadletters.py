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

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from enricher import metrics
from enricher.config import RETRY_MAX_SECONDS, Settings
from enricher.errors import BrokerUnavailable
from enricher.stream.contract import DeadLetter
from enricher.stream.topics import read_topic

log = logging.getLogger("enricher.deadletters")


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
    timestamp: float | None = None  # when it was dead-lettered (the record's Kafka timestamp), epoch s
    offset: str = ""  # where it sits in the dead-letter topic: partition/offset

    def as_dict(self) -> dict:
        doc = asdict(self)
        doc["value"] = self.value.decode("utf-8", "replace")
        return doc


def _record(msg) -> DeadLetterRecord:
    h = {k: (v or b"").decode("utf-8", "replace") for k, v in (msg.headers() or [])}

    def number(key):
        try:
            return int(h[key])
        except (KeyError, ValueError):
            return None

    kind, ms = msg.timestamp()
    return DeadLetterRecord(msg.value() or b"", h.get("enricher.reason", ""), h.get("enricher.detail", ""),
                            h.get("enricher.source", ""), h.get("enricher.model_id"),
                            number("enricher.batch_index"), number("enricher.original_bytes"),
                            h.get("enricher.original_sha256"), ms / 1000 if kind and ms >= 0 else None,
                            f"{msg.partition()}/{msg.offset()}")


def read(settings: Settings, expected: int, timeout: float = 30.0) -> list[DeadLetterRecord]:
    """Read the dead-letter topic from the start until `expected` records (or timeout)."""
    return [_record(msg) for msg in read_topic(settings, settings.dlq_topic, expected, timeout)]


def browse(settings: Settings, model: str | None = None, reason: str | None = None,
           since: float | None = None, follow: bool = False, stop: threading.Event | None = None,
           timeout: float = 15.0) -> Iterator[DeadLetterRecord]:
    """The dead letters, oldest first per partition, filtered by model, reason and age
    (`since`: seconds back from now). Without `follow` it ends once it has read every
    partition to its end; with it, it waits for new ones until `stop` is set.

    Partitions are assigned, not subscribed: a reader joins no group, so it
    starts at once (a group's join takes seconds) and moves no committed offset.
    The end of a partition is the high watermark its fetch responses carry, not a
    ListOffsets answer (the embedded broker's is wrong: ../shared/SERVICES.md).
    `since` seeks by the records' timestamps (ListOffsets by time) on a Kafka
    cluster; on the embedded broker, whose answer cannot be trusted either, it
    reads from the beginning and skips the older records (the filter applies in
    both cases, so a seek that lands early costs time, never a record).
    """
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition

    stop = stop or threading.Event()
    topic = settings.dlq_topic
    consumer = Consumer({**settings.kafka_config(), "group.id": "enricher-deadletters",
                         "enable.auto.commit": False, "enable.partition.eof": False})
    try:
        try:
            meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        except KafkaException as exc:
            raise BrokerUnavailable(f"no Kafka broker answers at {settings.broker}: {exc}") from None
        if meta is None or meta.error is not None or not meta.partitions:
            return  # nothing was ever dead-lettered here
        partitions = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        cutoff_ms = int((time.time() - since) * 1000) if since is not None else None
        starts = [TopicPartition(topic, tp.partition, OFFSET_BEGINNING) for tp in partitions]
        if cutoff_ms is not None and not settings.broker_embedded:
            try:
                found = consumer.offsets_for_times([TopicPartition(topic, tp.partition, cutoff_ms)
                                                    for tp in partitions], timeout=timeout)
                # -1: no record that recent in that partition: nothing to read there but new ones
                starts = [TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END)
                          for tp in found]
            except KafkaException:  # no answer by time: read all, skip the old
                pass
        consumer.assign(starts)
        while not stop.is_set():
            for msg in consumer.consume(500, timeout=0.2):
                if msg.error():
                    continue
                letter = _record(msg)
                if cutoff_ms is not None and letter.timestamp is not None and letter.timestamp * 1000 < cutoff_ms:
                    continue
                if (model is None or letter.model_id == model) and (reason is None or letter.reason == reason):
                    yield letter
            if not follow and _read_to_the_end(consumer, partitions):
                return
    finally:
        consumer.close()


def _read_to_the_end(consumer, partitions) -> bool:
    """Whether every partition's position has reached the high watermark of its latest
    fetch response (unknown until a fetch answered: not yet)."""
    positions = consumer.position(partitions)
    for tp in positions:
        low, high = consumer.get_watermark_offsets(tp, cached=True)
        if high < 0:
            return False
        at = tp.offset if tp.offset >= 0 else low  # nothing consumed from it yet
        if at < high:
            return False
    return True


async def send(topic, dead: list[DeadLetter], settings: Settings) -> None:
    """Send every dead letter and wait until the broker has each: a message is
    not committed before its dead letter is durable.

    A value over ENRICHER_DLQ_MAX_BYTES is cut first (deadletters.record); one
    the producer or the broker still finds too large (a broker limit below
    ours) is cut by half again and sent at once, down to 1 KB, so no size is
    retried as it was. Any other failure (the broker unreachable, not yet a
    leader) is retried with backoff until it gets through."""
    pending = [(d, settings.dlq_max_bytes) for d in dead]
    delay = 0.5
    while pending:
        attempts = []
        for d, cap in pending:
            value, headers = record(d, settings.inference_topic, cap)
            try:
                attempts.append((d, cap, value, await topic.send(value=value, headers=headers)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - refused before it left (e.g. too large for the producer)
                attempts.append((d, cap, value, exc))
        futures = [f for *_, f in attempts if not isinstance(f, BaseException)]
        outcomes = iter(await asyncio.gather(*futures, return_exceptions=True))
        retry, cut, failure = [], False, None
        for d, cap, value, sent in attempts:
            result = sent if isinstance(sent, BaseException) else next(outcomes)
            if isinstance(result, asyncio.CancelledError):
                raise result
            if not isinstance(result, BaseException):
                if len(value) < len(d.raw):
                    metrics.DEAD_LETTERS_TRUNCATED.inc()
                continue
            if _too_large(result) and len(value) > 1024:
                retry.append((d, max(1024, len(value) // 2)))
                cut = True
            else:
                retry.append((d, cap))
                failure = result
        pending = retry
        if pending and failure is not None:
            log.error("%d dead letter(s) not acknowledged by the broker (%s); sending them again in %.1fs",
                      len(pending), failure, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)
        elif cut:
            log.warning("dead letter(s) too large for the broker: cut further and sent again "
                        "(ENRICHER_DLQ_MAX_BYTES is above the broker's limit)")


def _too_large(exc: BaseException) -> bool:
    """Whether a send failed for the record's size (Faust wraps aiokafka's error in its own)."""
    from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError  # the worker's: already loaded

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (MessageSizeTooLargeError, RecordTooLargeError)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
