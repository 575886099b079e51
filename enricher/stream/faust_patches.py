"""Three adjustments to faust-streaming 0.15 (and its mode), pinned to those versions.

Each replaces or extends code Faust gives no setting for. Each checks, before
applying, that the upstream code it replaces or relies on is byte for byte
the code it was written against (a SHA-256 of the source); if not, it leaves
Faust alone and logs why. tests/test_faust_pin.py fails when an upgrade
changes that code, so the adjustment is re-checked by a person, never
silently applied to new code.

1. `shorten_fetch_wait`: Faust builds its aiokafka consumer with a fixed
   fetch_max_wait_ms=1500. A broker that holds a fetch for the whole wait even
   when records are there (Tansu does) then adds up to 1.5 s to every
   inference's latency.

2. `batched_intake`: Faust turns every fetched record into a message and an
   event, one at a time, on its way to an agent: conductor, stream buffer,
   take_events, a per-event ack. With one inference per message that per-event
   path, not the enrichment, is what bounds the worker (benchmarks/README.md).
   The patched `Consumer.getmany` (upstream's, plus one line) first gives the
   records of every topic that has an intake (`app.record_intakes`) to that
   intake, a partition's records at a time, with upstream's checks made per
   partition (flow active, same generation, partition not paused); what the
   intake does with them, and how their offsets reach Faust's commits, is in
   enricher/stream/intake.py. Other topics take upstream's path unchanged.
   Pinned with it: `ack` (whose bookkeeping the intake fills), `_new_offset`
   (the commit scan that reads it) and `perform_seek` (what brings records a
   rebalance dropped back).

3. `EnricherWorker`: a deadline on shutdown. mode's Worker stops on SIGTERM by
   scheduling `_stop_on_signal` from `_schedule_shutdown`, and waits for it
   however long it takes; a batch stuck on a store that is down would hold
   the process past any orchestrator's grace period, to be SIGKILLed. The
   subclass arms a timer in that hook and then calls upstream's; the hook's
   source is pinned by its SHA-256 in tests/test_faust_pin.py.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import threading
from typing import AsyncIterator, Tuple

import faust
from faust.types import TP, Message

log = logging.getLogger("enricher.faust")

# SHA-256 of the upstream source each adjustment replaces or relies on (faust-streaming 0.15.3).
# Consumer.getmany is replaced; ack's bookkeeping (_acked, _acked_index, _n_acked) is what
# RecordIntake.acknowledge fills in its stead; _new_offset is the commit scan that reads it
# (sorted, no offset twice); perform_seek is what brings back records a rebalance dropped.
GETMANY_SHA256 = "4b168d84882a70d6e3e2f9804430a63b92f8fd117d3187cbb4aeb54305bda34e"
ACK_SHA256 = "5fcf41cf45153475de3790dc56fec1b83335956dc8b3bf7ff6bbb2b57627f03f"
NEW_OFFSET_SHA256 = "1d2c7ea89a7ad4f1a216c1d51936e569162cd66bd56f889e13fd29c910b58eb0"
PERFORM_SEEK_SHA256 = "0e8c130ff4b0afd82c0be9c5fd831316e10febc62c94032833911096e156d7c6"
CREATE_WORKER_CONSUMER_SHA256 = "c2701bfc3e6f6cad95c2be36d6a255a86e2c57d18d36cc1082b5fb5c482d99d7"
# aiokafka's AIOKafkaConsumer.start (0.14.0), which reads the private `_fetch_max_wait_ms`
# that shorten_fetch_wait sets: the attribute is aiokafka's, not ours, so it is pinned too.
AIOKAFKA_CONSUMER_START_SHA256 = "2f1ba70443327538800d348e61042cdedd5a5e6306f40ebe1a06dddba7494c45"
# mode's Worker._schedule_shutdown (mode-streaming 0.7.1), the hook EnricherWorker extends.
SCHEDULE_SHUTDOWN_SHA256 = "1a6a5dfc88c2298b7ddc84be024a4344a54eaca8ba3a2d39e0447fa5b3905aa4"


def source_sha256(function) -> str | None:
    """The SHA-256 of a function's source, or None where the source cannot be
    read (an image without .py files): then no adjustment is applied."""
    try:
        return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()
    except (OSError, TypeError):
        return None


def _upstream(function):
    return getattr(function, "__wrapped__", function)


def shorten_fetch_wait(max_wait_ms: int) -> bool:
    """Make Faust's Kafka consumer wait at most `max_wait_ms` for a fetch.

    aiokafka reads the value from the consumer's attribute when it starts, so
    setting it right after Faust builds the consumer is enough. Returns whether
    the adjustment is in place.
    """
    from aiokafka import AIOKafkaConsumer
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    original = _upstream(AIOKafkaConsumerThread._create_worker_consumer)
    if source_sha256(original) != CREATE_WORKER_CONSUMER_SHA256:
        log.warning("faust-streaming's consumer construction changed upstream (or its source cannot be read): "
                    "fetch wait left at Faust's default")
        return False
    if source_sha256(AIOKafkaConsumer.start) != AIOKAFKA_CONSUMER_START_SHA256:
        log.warning("aiokafka's consumer start changed upstream (or its source cannot be read): it may no longer "
                    "read _fetch_max_wait_ms; fetch wait left at Faust's default")
        return False

    def create(self, transport):
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = max_wait_ms
        return consumer

    create.__wrapped__ = original
    AIOKafkaConsumerThread._create_worker_consumer = create
    return True


async def _hand_over_batches(consumer, records, active_partitions, generation_id):
    """Give each partition's records of a topic with an intake to the intake,
    whole; return the records of the other topics, for Faust's own path.

    Upstream's checks, made per partition instead of per record: nothing is
    handed over once the flow stops or the generation changes (a rebalance),
    nor from a partition that is not active (paused).
    """
    intakes = getattr(consumer.app, "record_intakes", None)
    if not intakes or not consumer.flow_active:
        return records  # upstream's path unchanged (it seeks back when the flow is not active)
    rest = {}
    for tp, batch in records.items():
        intake = intakes.get(tp.topic)
        if intake is None:
            rest[tp] = batch
            continue
        if not consumer.flow_active or consumer.app.consumer_generation_id != generation_id:
            return {}
        if not batch or not (active_partitions is None or tp in active_partitions
                             or tp in consumer._buffered_partitions):
            continue
        if not await intake.hand_over(consumer, tp, batch):
            return {}  # a rebalance suspended the flow while the intake was full
    return rest


async def _getmany(self, timeout: float) -> AsyncIterator[Tuple[TP, Message]]:  # pragma: no cover
    """Fetch batch of messages from server."""
    # Upstream's Consumer.getmany (faust-streaming 0.15.3), line for line,
    # except the one marked "added" (tests/test_faust_pin.py diffs them).
    records, active_partitions = await self._wait_next_records(timeout)
    generation_id = self.app.consumer_generation_id
    if records is None or self.should_stop:
        return

    records = await _hand_over_batches(self, records, active_partitions, generation_id)  # added
    records_it = self.scheduler.iterate(records)
    to_message = self._to_message  # localize
    if self.flow_active:
        for tp, record in records_it:
            if not self.flow_active:
                break
            new_generation_id = self.app.consumer_generation_id
            if new_generation_id != generation_id:
                self.log.dev(
                    "Generation id changed from %r to %r. Cancelling getmany.",
                    generation_id,
                    new_generation_id,
                )
                break
            if (
                active_partitions is None
                or tp in active_partitions
                or tp in self._buffered_partitions
            ):
                highwater_mark = self.highwater(tp)
                self.app.monitor.track_tp_end_offset(tp, highwater_mark)
                # convert timestamp to seconds from int milliseconds.
                yield tp, to_message(tp, record)
    else:
        self.log.dev(
            "getmany called while flow not active. Seek back to committed offsets."
        )
        try:
            await self.perform_seek()
        except Exception as ex:
            self.log.warning(f"exception performing seek when flow not active {ex}")


def batched_intake() -> bool:
    """Install the consumer fetch that hands whole partitions' records to
    intakes (enricher/stream/intake.py); returns whether it is in place."""
    from faust.transport import consumer as upstream

    checks = ((_upstream(upstream.Consumer.getmany), GETMANY_SHA256, "its fetch (getmany)"),
              (upstream.Consumer.ack, ACK_SHA256, "its acknowledgement bookkeeping (ack)"),
              (upstream.Consumer._new_offset, NEW_OFFSET_SHA256, "its commit scan (_new_offset)"),
              (upstream.Consumer.perform_seek, PERFORM_SEEK_SHA256, "its seek to committed offsets"))
    for function, digest, what in checks:
        if source_sha256(function) != digest:
            log.warning("faust-streaming changed %s upstream (or its source cannot be read): "
                        "records are handed over one event per message", what)
            return False
    _getmany.__wrapped__ = _upstream(upstream.Consumer.getmany)
    upstream.Consumer.getmany = _getmany
    return True


class EnricherWorker(faust.Worker):
    """Faust's worker, with a deadline on shutdown: after SIGTERM (or SIGINT)
    the worker has ENRICHER_SHUTDOWN_GRACE seconds to stop cleanly (finish or
    abandon the batch in hand, commit what was written); past that it exits
    at once. Either way nothing unwritten is committed: offsets are committed
    only for events whose rows and dead letters are durable."""

    grace: float = 30.0

    def _schedule_shutdown(self, signal) -> None:
        if not self._signal_stop_time:
            timer = threading.Timer(self.grace, _exit_now, args=(self.grace,))
            timer.daemon = True
            timer.start()
        super()._schedule_shutdown(signal)


def _exit_now(grace: float) -> None:
    log.error("not stopped within ENRICHER_SHUTDOWN_GRACE=%ss; exiting now (nothing unwritten was committed)",
              grace)
    logging.shutdown()
    os._exit(1)
