"""Producing inferences: the helper our users (and the demo) send with.

By default inferences are batched: many go in one Kafka message, as a JSON
array or an Arrow IPC stream, which is how the worker reaches its best speed.
`batch="none"` sends one inference per message.
"""

from __future__ import annotations

from typing import Iterable

import orjson
import pyarrow as pa
from confluent_kafka import Producer

from enricher.config import Settings
from enricher.errors import EnricherError, InvalidArgument
from enricher.stream.contract import ARROW_STREAM, JSON, to_ipc

BATCH_FORMATS = ("json", "arrow", "none")



class DeliveryFailed(EnricherError, RuntimeError):
    """The broker did not take every message sent (unreachable, or it refused them)."""

class InferenceProducer:
    def __init__(self, settings: Settings, topic: str | None = None, batch: str = "json",
                 batch_rows: int = 1000, batch_bytes: int = 512 * 1024, **kafka_overrides):
        if batch not in BATCH_FORMATS:
            raise InvalidArgument(f"batch must be one of {', '.join(BATCH_FORMATS)}, got {batch!r}")
        if batch_rows < 1 or batch_bytes < 1:
            raise InvalidArgument("batch_rows and batch_bytes must be positive")
        # No sticky partitioning: librdkafka would put every keyless message of a burst on one
        # partition (all of a file's batched messages, a worker's worth of rows each), so one
        # worker of the group would do all the work; each message takes a random partition.
        conf = {**settings.kafka_config(), "linger.ms": 20, "batch.num.messages": 10000,
                "enable.idempotence": True, "sticky.partitioning.linger.ms": 0, **kafka_overrides}
        self.producer = Producer(conf)
        self.topic = topic or settings.inference_topic
        self.batch = batch
        self.batch_rows = batch_rows
        # Stay well under the broker's and the worker's message size limits.
        self.batch_bytes = min(batch_bytes, settings.max_message_bytes // 2)
        self.errors: list[str] = []
        self.messages = 0
        self._rows: list = []
        self._size = 0

    def _on_delivery(self, err, msg):
        if err is not None:
            self.errors.append(str(err))

    def _produce(self, value: bytes, content_type: str | None = None) -> None:
        headers = [("content-type", content_type.encode())] if content_type else None
        while True:
            try:
                self.producer.produce(self.topic, value, headers=headers, on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain, then go on
                self.producer.poll(0.1)
        self.messages += 1
        self.producer.poll(0)

    def send(self, inference: dict | bytes) -> None:
        """Queue one inference (a dict, or its JSON bytes)."""
        if self.batch == "none":
            return self._produce(inference if isinstance(inference, (bytes, bytearray)) else orjson.dumps(inference))
        if self.batch == "json":
            item = inference if isinstance(inference, (bytes, bytearray)) else orjson.dumps(inference)
            size = len(item) + 1
        else:
            item = orjson.loads(inference) if isinstance(inference, (bytes, bytearray)) else inference
            size = 64 * (len(item.get("features", ())) + 4)  # a rough guess: Arrow is compact
        if self._rows and self._size + size > self.batch_bytes:
            self._send_batch()
        self._rows.append(item)
        self._size += size
        if len(self._rows) >= self.batch_rows:
            self._send_batch()

    def send_alone(self, value: bytes, content_type: str | None = None) -> None:
        """Send bytes as a message of their own (with a content-type header if given), whatever the batching."""
        self._send_batch()
        self._produce(value, content_type)

    def _send_batch(self) -> None:
        if not self._rows:
            return
        if self.batch == "json":
            self._produce(b"[" + b",".join(self._rows) + b"]", JSON)
        else:
            self._produce(to_ipc(pa.Table.from_pylist(self._rows)), ARROW_STREAM)
        self._rows = []
        self._size = 0

    def send_many(self, inferences: Iterable[dict | bytes]) -> int:
        n = 0
        for inference in inferences:
            self.send(inference)
            n += 1
        return n

    def flush(self, timeout: float = 60.0) -> None:
        self._send_batch()
        remaining = self.producer.flush(timeout)
        if remaining:
            raise DeliveryFailed(f"{remaining} messages not delivered within {timeout}s")
        if self.errors:
            raise DeliveryFailed(f"{len(self.errors)} messages failed: {self.errors[0]}")
