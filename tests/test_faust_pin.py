"""What the worker relies on inside faust-streaming. These fail when an
upgrade changes it: re-check the adjustment in enricher/worker.py then."""

import inspect
from importlib import metadata

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread


def test_faust_still_fixes_the_fetch_wait_where_we_adjust_it():
    assert metadata.version("faust-streaming").startswith("0.15.")
    source = inspect.getsource(getattr(AIOKafkaConsumerThread._create_worker_consumer, "__wrapped__",
                                       AIOKafkaConsumerThread._create_worker_consumer))
    assert "fetch_max_wait_ms=1500" in source
    assert "return aiokafka.AIOKafkaConsumer(" in source


def test_aiokafka_reads_the_fetch_wait_from_the_attribute_we_set():
    import aiokafka.consumer.consumer as consumer

    source = inspect.getsource(consumer.AIOKafkaConsumer)
    assert "self._fetch_max_wait_ms = fetch_max_wait_ms" in source
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in source


def test_take_events_still_acks_on_the_next_take():
    # worker.py gives every message one extra reference so that this ack is not the final one.
    import faust.streams

    source = inspect.getsource(faust.streams.Stream.take_events)
    assert "await self.ack(event)" in source


def test_the_adjusted_consumer_waits_as_configured(broker):
    import asyncio

    import faust

    from enricher.worker import shorten_fetch_wait

    shorten_fetch_wait(77)
    shorten_fetch_wait(77)  # idempotent: wraps the original once

    async def build():
        app = faust.App("pin-test", broker=broker.url)
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        return consumer._fetch_max_wait_ms

    assert asyncio.run(build()) == 77
