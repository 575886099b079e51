"""Three adjustments to faust-streaming 0.15 (and its mode), pinned to those versions.

Each replaces or extends code Faust gives no setting for. The first two Each checks, before applying,
that the upstream code it replaces is byte for byte the code it was written
against (a SHA-256 of the source); if not, it leaves Faust alone and logs why.
tests/test_faust_pin.py fails when an upgrade changes that code, so the
adjustment is re-checked by a person, never silently applied to new code.

1. `shorten_fetch_wait`: Faust builds its aiokafka consumer with a fixed
   fetch_max_wait_ms=1500. A broker that holds a fetch for the whole wait even
   when records are there (Tansu does) then adds up to 1.5 s to every
   inference's latency.

2. `eager_hand_over`: Faust's consumer loop hands each message to the
   conductor with `await self.wait_first(callback(message),
   self.suspend_flow.wait())`, so that a hand-over blocked on a full stream
   buffer, on flow control or on producer back-pressure is abandoned when a
   rebalance suspends the flow. That costs four asyncio tasks created and
   three cancelled per message: about a third of the event loop's time with
   one inference per message (see benchmarks/README.md). Almost always the
   hand-over completes without waiting at all (it puts the event in a queue
   that has room). The patched loop first runs the hand-over eagerly, up to its
   first suspension, with no task; only if it does suspend is the rest run as
   a task raced against `suspend_flow` exactly as upstream does, and when the
   flow is already suspended the upstream call is made unchanged. The
   observable behaviour on rebalance, pause and commit is upstream's
   (tests/test_faust_pin.py and tests/test_stream.py show it).

3. `EnricherWorker`: a deadline on shutdown. mode's Worker stops on SIGTERM by
   scheduling `_stop_on_signal` from `_schedule_shutdown`, and waits for it
   however long it takes; a batch stuck on a store that is down would hold
   the process past any orchestrator's grace period, to be SIGKILLed. The
   subclass arms a timer in that hook and then calls upstream's; the hook's
   source is pinned by its SHA-256 in tests/test_faust_pin.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
import threading
from typing import AsyncIterator, cast

import faust
from faust.transport.consumer import CONSUMER_FETCHING
from mode import Service, ServiceT

log = logging.getLogger("enricher.faust")

# SHA-256 of the upstream source each adjustment replaces (faust-streaming 0.15.3).
DRAIN_MESSAGES_SHA256 = "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417"
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


async def _finish(coro, yielded):
    """Drive a coroutine that already ran up to its first suspension (it
    yielded `yielded`) to its end, as an asyncio Task would have: wait for the
    future it waits for, then resume it; pass exceptions, cancellation
    included, into it at the point where it waits."""
    while True:
        try:
            if yielded is None:  # a bare yield (asyncio.sleep(0)): one loop turn
                await asyncio.sleep(0)
            elif asyncio.isfuture(yielded):
                # The coroutine's own await marked the future as yielded to a
                # task; a Task clears the mark when it takes the future, and
                # awaiting it again refuses a marked future. Do as Task does.
                yielded._asyncio_future_blocking = False
                await yielded
            else:
                raise RuntimeError(f"hand-over yielded {yielded!r}, not a future")
        except BaseException as exc:  # noqa: BLE001 - handed to the coroutine, which decides
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value


async def _hand_over(consumer, callback, message) -> None:
    suspend_flow = consumer.suspend_flow
    if suspend_flow.is_set():  # flow already suspended: upstream's call, unchanged
        await consumer.wait_first(callback(message), suspend_flow.wait())
        return
    coro = callback(message)
    try:
        yielded = coro.send(None)
    except StopIteration:
        return  # handed over without waiting: the usual case, no task at all
    # It waits (full buffer, flow control, producer back-pressure): finish it
    # as a task raced against a suspended flow, as upstream does.
    await consumer.wait_first(asyncio.ensure_future(_finish(coro, yielded)), suspend_flow.wait())


async def _drain_messages(self, fetcher: ServiceT) -> None:  # pragma: no cover
    # Upstream's Consumer._drain_messages (faust-streaming 0.15.3), line for
    # line, except the one marked "changed" (tests/test_faust_pin.py diffs them).
    callback = self.callback
    getmany = self.getmany
    consumer_should_stop = cast(Service, self)._stopped.is_set
    fetcher_should_stop = cast(Service, fetcher)._stopped.is_set

    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    flag_consumer_fetching = CONSUMER_FETCHING
    set_flag = self.diag.set_flag
    unset_flag = self.diag.unset_flag
    commit_every = self._commit_every
    acks_enabled_for = self.app.topics.acks_enabled_for

    yield_every = 100
    num_since_yield = 0
    sleep = asyncio.sleep

    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(flag_consumer_fetching)
            ait = cast(AsyncIterator, getmany(timeout=1.0))

            # Sleeping because sometimes getmany is called in a loop
            # never releasing to the event loop
            await self.sleep(0)
            if not self.should_stop:
                async for tp, message in ait:
                    num_since_yield += 1
                    if num_since_yield > yield_every:
                        await sleep(0)
                        num_since_yield = 0

                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is None or offset >= r_offset:
                        gap = offset - (r_offset or 0)
                        # We have a gap in income messages
                        if gap > 1 and r_offset:
                            acks_enabled = acks_enabled_for(message.topic)
                            if acks_enabled:
                                await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None:
                            if self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                        await _hand_over(self, callback, message)  # changed: was wait_first(...)
                        set_read_offset(tp, offset)
                    else:
                        self.log.dev(
                            "DROPPED MESSAGE ROFF %r: k=%r v=%r",
                            offset,
                            message.key,
                            message.value,
                        )
                unset_flag(flag_consumer_fetching)

    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            # we're already stopping so ignore
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            # we're already stopping so ignore
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(flag_consumer_fetching)


def eager_hand_over() -> bool:
    """Install the patched consumer loop; returns whether it is in place."""
    from faust.transport import consumer as upstream

    original = _upstream(upstream.Consumer._drain_messages)
    if source_sha256(original) != DRAIN_MESSAGES_SHA256:
        log.warning("faust-streaming's consumer loop changed upstream (or its source cannot be read): "
                    "per-message hand-over left as is")
        return False
    _drain_messages.__wrapped__ = original
    upstream.Consumer._drain_messages = _drain_messages
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
