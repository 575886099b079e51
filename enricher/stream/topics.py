"""Create the inference, dead-letter and control topics if they do not exist."""

from __future__ import annotations

import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from enricher.config import Settings
from enricher.errors import BrokerUnavailable  # noqa: F401 - raised here; callers import it from either


def ensure_topics(settings: Settings, timeout: float = 15.0) -> None:
    admin = AdminClient(settings.kafka_config())
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        hint = " (start the embedded one with `enricher broker`)" if settings.broker_embedded else ""
        raise BrokerUnavailable(f"no Kafka broker answers at {settings.broker}{hint}: {exc}") from exc
    wanted = [NewTopic(t, num_partitions=settings.topic_partitions, replication_factor=-1)
              for t in (settings.inference_topic, settings.dlq_topic) if t not in existing]
    if settings.control_topic not in existing:  # one partition: control events keep their order
        wanted.append(NewTopic(settings.control_topic, num_partitions=1, replication_factor=-1))
    if not wanted:
        return
    for topic, future in admin.create_topics(wanted, request_timeout=timeout).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def read_topic(settings: Settings, topic: str, expected: int, timeout: float = 30.0) -> list:
    """Read a topic from its beginning until `expected` messages (or timeout).

    Partitions are assigned directly, not through a consumer group, so a
    reader joins no group and moves no committed offset.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({**settings.kafka_config(), "group.id": "enricher-reader", "enable.auto.commit": False})
    out: list = []
    deadline = time.monotonic() + timeout
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None:
            return out
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        while len(out) < expected and time.monotonic() < deadline:
            out += [m for m in consumer.consume(1000, timeout=0.2) if not m.error()]
    finally:
        consumer.close()
    return out
