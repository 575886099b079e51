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


# -- the batched intake (enricher/stream/faust_patches.py, enricher/stream/intake.py) ----
def _code_lines(source: str) -> list[str]:
    import textwrap

    lines = textwrap.dedent(source).splitlines()
    return [line for line in lines if line.strip() and not line.strip().startswith("#")]


def test_faust_code_the_intake_replaces_or_relies_on_is_the_code_it_was_written_against():
    from faust.transport import consumer

    from enricher.stream.faust_patches import (
        ACK_SHA256,
        GETMANY_SHA256,
        NEW_OFFSET_SHA256,
        PERFORM_SEEK_SHA256,
        _upstream,
        source_sha256,
    )

    for function, digest in ((_upstream(consumer.Consumer.getmany), GETMANY_SHA256),
                             (consumer.Consumer.ack, ACK_SHA256),
                             (consumer.Consumer._new_offset, NEW_OFFSET_SHA256),
                             (consumer.Consumer.perform_seek, PERFORM_SEEK_SHA256)):
        assert source_sha256(function) == digest, (
            f"faust-streaming changed Consumer.{function.__name__}: re-check enricher/stream/intake.py against it")


def test_the_patched_fetch_differs_from_upstream_only_in_the_hand_over():
    import difflib

    from faust.transport import consumer

    from enricher.stream import faust_patches

    upstream = _code_lines(inspect.getsource(faust_patches._upstream(consumer.Consumer.getmany)))
    ours = _code_lines(inspect.getsource(faust_patches._getmany))
    diff = list(difflib.ndiff(upstream, ours))
    removed = [line[2:].strip() for line in diff if line.startswith("- ")]
    added = [line[2:].strip() for line in diff if line.startswith("+ ")]
    assert removed == ["async def getmany(self, timeout: float) -> AsyncIterator[Tuple[TP, Message]]:"]
    assert added == ["async def _getmany(self, timeout: float) -> AsyncIterator[Tuple[TP, Message]]:  # pragma: no cover",
                     "records = await _hand_over_batches(self, records, active_partitions, generation_id)  # added"]


def test_what_the_intake_writes_is_what_faust_acks_and_commits_from():
    # RecordIntake.acknowledge fills these in place of Consumer.ack: the names must still be Faust's.
    from faust.transport import consumer

    ack = inspect.getsource(consumer.Consumer.ack)
    for line in ("acked_index = self._acked_index[tp]", "acked_for_tp = self._acked[tp]", "self._n_acked += 1",
                 "notify(self._waiting_for_ack)", "with ack_lock:"):
        assert line in ack
    assert "batch = next(consecutive_numbers(acked))" in inspect.getsource(consumer.Consumer._new_offset)


def test_installing_the_patch_replaces_the_fetch_once_and_keeps_the_original():
    from faust.transport import consumer

    from enricher.stream import faust_patches

    assert faust_patches.batched_intake() and faust_patches.batched_intake()
    assert consumer.Consumer.getmany is faust_patches._getmany
    assert faust_patches.source_sha256(consumer.Consumer.getmany.__wrapped__) == faust_patches.GETMANY_SHA256


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
    assert faust_patches.batched_intake() is False
    assert "cannot be read" in caplog.text


def test_mode_still_schedules_a_signal_stop_from_the_hook_the_shutdown_deadline_extends():
    from faust import Worker

    from enricher.stream.faust_patches import SCHEDULE_SHUTDOWN_SHA256, EnricherWorker, source_sha256

    assert source_sha256(Worker._schedule_shutdown) == SCHEDULE_SHUTDOWN_SHA256
    import mode

    assert "self._schedule_shutdown(signal.SIGTERM)" in inspect.getsource(mode.Worker._on_sigterm)
    assert "super()._on_sigterm()" in inspect.getsource(Worker._on_sigterm)
    assert EnricherWorker._schedule_shutdown is not Worker._schedule_shutdown
