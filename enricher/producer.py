"""Producing inferences: the helper our users (and the demo) send with."""

from __future__ import annotations

from typing import Iterable

import orjson
from confluent_kafka import Producer

from .config import Settings


class InferenceProducer:
    def __init__(self, settings: Settings, topic: str | None = None, **kafka_overrides):
        conf = {**settings.kafka_config(), "linger.ms": 20, "batch.num.messages": 10000,
                "enable.idempotence": True, **kafka_overrides}
        self.producer = Producer(conf)
        self.topic = topic or settings.inference_topic
        self.errors: list[str] = []

    def _on_delivery(self, err, msg):
        if err is not None:
            self.errors.append(str(err))

    def send(self, inference: dict | bytes) -> None:
        value = inference if isinstance(inference, (bytes, bytearray)) else orjson.dumps(inference)
        while True:
            try:
                self.producer.produce(self.topic, value, on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain, then go on
                self.producer.poll(0.1)
        self.producer.poll(0)

    def send_many(self, inferences: Iterable[dict | bytes]) -> int:
        n = 0
        for inference in inferences:
            self.send(inference)
            n += 1
        return n

    def flush(self, timeout: float = 60.0) -> None:
        remaining = self.producer.flush(timeout)
        if remaining:
            raise RuntimeError(f"{remaining} messages not delivered within {timeout}s")
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} messages failed: {self.errors[0]}")
