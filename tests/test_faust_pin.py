"""What the worker relies on inside faust-streaming. These fail when an
upgrade changes it: re-check the adjustment in enricher/stream/faust_patches.py then."""

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

    from enricher.stream.faust_patches import shorten_fetch_wait

    shorten_fetch_wait(77)
    shorten_fetch_wait(77)  # idempotent: wraps the original once

    async def build():
        app = faust.App("pin-test", broker=broker.url)
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        return consumer._fetch_max_wait_ms

    assert asyncio.run(build()) == 77


# -- the consumer loop's hand-over (enricher/stream/faust_patches.py) ------------------
def _code_lines(source: str) -> list[str]:
    import textwrap

    lines = textwrap.dedent(source).splitlines()
    return [line for line in lines if not line.strip().startswith("#")]


def test_faust_consumer_loop_is_the_one_the_patch_was_written_against():
    from faust.transport import consumer

    from enricher.stream.faust_patches import DRAIN_MESSAGES_SHA256, _upstream, source_sha256

    assert source_sha256(_upstream(consumer.Consumer._drain_messages)) == DRAIN_MESSAGES_SHA256, (
        "faust-streaming changed Consumer._drain_messages: re-check enricher/stream/faust_patches.py against it")


def test_the_patched_loop_differs_from_upstream_only_in_the_hand_over():
    import difflib

    from faust.transport import consumer

    from enricher.stream import faust_patches

    upstream = _code_lines(inspect.getsource(faust_patches._upstream(consumer.Consumer._drain_messages)))
    ours = _code_lines(inspect.getsource(faust_patches._drain_messages))
    removed = [line[2:].strip() for line in difflib.ndiff(upstream, ours) if line.startswith("- ")]
    added = [line[2:].strip() for line in difflib.ndiff(upstream, ours) if line.startswith("+ ")]
    assert removed == ["await self.wait_first(", "callback(message), self.suspend_flow.wait()", ")"]
    assert added == ["await _hand_over(self, callback, message)  # changed: was wait_first(...)"]


def test_installing_the_patch_replaces_the_loop_once_and_keeps_the_original():
    from faust.transport import consumer

    from enricher.stream import faust_patches

    assert faust_patches.eager_hand_over() and faust_patches.eager_hand_over()
    assert consumer.Consumer._drain_messages is faust_patches._drain_messages
    assert faust_patches.source_sha256(consumer.Consumer._drain_messages.__wrapped__) == \
        faust_patches.DRAIN_MESSAGES_SHA256


def test_aiokafka_start_is_pinned_by_its_hash_in_the_product_code():
    from aiokafka import AIOKafkaConsumer

    from enricher.stream.faust_patches import AIOKAFKA_CONSUMER_START_SHA256, source_sha256

    assert source_sha256(AIOKafkaConsumer.start) == AIOKAFKA_CONSUMER_START_SHA256


def test_without_readable_sources_no_adjustment_is_applied(monkeypatch, caplog):
    # An image shipped without .py files: inspect.getsource raises OSError.
    import inspect

    from enricher.stream import faust_patches

    def no_source(_):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", no_source)
    assert faust_patches.source_sha256(test_without_readable_sources_no_adjustment_is_applied) is None
    assert faust_patches.shorten_fetch_wait(100) is False
    assert faust_patches.eager_hand_over() is False
    assert "cannot be read" in caplog.text


def test_mode_still_schedules_a_signal_stop_from_the_hook_the_shutdown_deadline_extends():
    from faust import Worker

    from enricher.stream.faust_patches import SCHEDULE_SHUTDOWN_SHA256, EnricherWorker, source_sha256

    assert source_sha256(Worker._schedule_shutdown) == SCHEDULE_SHUTDOWN_SHA256
    import mode

    assert "self._schedule_shutdown(signal.SIGTERM)" in inspect.getsource(mode.Worker._on_sigterm)
    assert "super()._on_sigterm()" in inspect.getsource(Worker._on_sigterm)
    assert EnricherWorker._schedule_shutdown is not Worker._schedule_shutdown
