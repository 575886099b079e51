"""The streaming worker: Faust's app and consumer group over the inference topic.

Faust's consumer hands the worker each partition's fetched records at once
(stream/intake.py, through the pinned adjustment in stream/faust_patches.py):
no Faust event per message. Per batch (up to ENRICHER_BATCH_SIZE messages
or ENRICHER_BATCH_TIMEOUT seconds): parse and validate once, enrich, insert
into ClickHouse, send dead letters, and only then acknowledge the batch's
offsets. Faust commits acknowledged offsets, so an offset is committed only
after its row is in ClickHouse and its dead letter is on the broker
(at-least-once); a redelivered batch is absorbed by the table's view (see
clickhouse.py). What was taken but is not durable is never acknowledged,
however the worker stops (SIGTERM, a crash, a rebalance): it comes back on
restart or to the partition's next owner.

This module is the composition root: the Faust app, the batch loop and the
jobs it schedules. What they run lives along the flow: the intake
(stream/intake.py), the batch (stream/batch.py), dead letters and their
sending (stream/deadletters.py), the label sweep (store/labels.py), the
window reports' gauges (store/reports.py), the announcements
(control/plane.py), Kafka credentials (config.py), the shutdown deadline and
Faust's adjustments (stream/faust_patches.py).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import threading
import time

import faust

from enricher import metrics
from enricher.config import RETRY_MAX_SECONDS, Settings
from enricher.control.locations import Locations
from enricher.control.plane import ControlEvents, ControlPlane, follow_announcements
from enricher.control.registry import open_registry
from enricher.http.api import check_exposure, install, scheme, web_options
from enricher.models import ENRICHMENTS
from enricher.store.labels import LabelSweeper
from enricher.store.reports import ReportExporter
from enricher.store.sink import ClickHouseSink, StoreUnavailable
from enricher.stream import deadletters
from enricher.stream.batch import BatchProcessor, Messages, Outcome
from enricher.stream.faust_patches import EnricherWorker, batched_intake, shorten_fetch_wait
from enricher.stream.intake import RecordIntake, messages, pieces
from enricher.stream.serving import Serving
from enricher.stream.topics import ensure_topics

log = logging.getLogger("enricher.worker")


class Progress:
    """Totals since start, for /status (the demo and operators read it)."""

    def __init__(self):
        self.consumed = 0
        self.enriched = 0
        self.dead_lettered = 0
        self.batches = 0
        self.started = time.time()
        self.consuming_at: float | None = None  # when the batch loop began (views made, with the embedded store)
        self.first_batch_at: float | None = None  # when the first batch was taken
        self.last_batch_at: float | None = None   # when the latest batch was acknowledged

    def as_dict(self) -> dict:
        return {"consumed": self.consumed, "enriched": self.enriched, "dead_lettered": self.dead_lettered,
                "batches": self.batches, "uptime_s": round(time.time() - self.started, 1),
                "consuming_at": self.consuming_at,
                "first_batch_at": self.first_batch_at, "last_batch_at": self.last_batch_at}


class EnricherApp(faust.App):
    # topic -> its RecordIntake: the patched consumer hands these topics' records over whole
    record_intakes: dict[str, RecordIntake] = {}

    def on_init_dependencies(self):
        services = super().on_init_dependencies()
        # Faust's Monitor sensor keeps per-event statistics nobody here reads
        # (our metrics are Prometheus'): ~8% of the per-message cost.
        self.sensors.remove(self.monitor)
        return services

    # Faust keeps per-rebalance state from its sensors and logs a warning
    # when there is none (we removed the only one); record our own instead.
    def on_rebalance_start(self) -> None:
        super().on_rebalance_start()
        # Called from Faust's consumer thread, before Faust forgets the revoked partitions' acks.
        for intake in self.record_intakes.values():
            intake.revoke()
        self._rebalancing_sensor_state = self._rebalancing_sensor_state or {"time_start": time.monotonic()}

    def on_rebalance_end(self) -> None:
        state = self._rebalancing_sensor_state or {}
        if "time_start" in state:
            metrics.REBALANCES.observe(time.monotonic() - state["time_start"])
        super().on_rebalance_end()


def build_app(settings: Settings) -> faust.App:
    app = EnricherApp(
        settings.consumer_group,
        broker=settings.broker,
        broker_credentials=settings.faust_credentials(),
        broker_session_timeout=settings.session_timeout,
        broker_heartbeat_interval=max(settings.session_timeout / 6, 0.5),
        consumer_auto_offset_reset="earliest",
        # Faust would wait, on a stop or a rebalance, for every taken event to be
        # acknowledged; ours are acknowledged only once durable, so with the store
        # down it would wait forever. Not waiting is safe: what is not acknowledged
        # is not committed, and comes back (to this worker or the partition's next owner).
        stream_wait_empty=False,
        value_serializer="raw",
        key_serializer="raw",
        **web_options(settings),
        # Faust's own pages (graph, router, tables, stats) are not ours to serve.
        web_graph_enabled=False, web_router_enabled=False, web_tables_enabled=False,
        web_stats_enabled=False, web_metrics_enabled=False,
        datadir=str(settings.data_dir / "faust"),
        topic_partitions=settings.topic_partitions,
        producer_acks=-1,
        # Records over this are refused by the producer itself (MessageSizeTooLargeError):
        # dead letters are then cut further (see deadletters.send).
        producer_max_request_size=settings.max_request_bytes,
        broker_max_poll_records=max(500, settings.batch_size),
        consumer_max_fetch_size=8 * 1024 * 1024,
    )
    registry = open_registry(settings)
    store = settings.artifacts()
    for name in ENRICHMENTS:  # at zero from the start: a series born at its first batch hides that batch from rate()
        metrics.ENRICHMENT_SECONDS.labels(name)
    serving = Serving(registry, store)
    loading = time.monotonic()
    serving.maintain()  # every enabled model's artifacts loaded, and pooled, before the first batch
    log.info("serving %d models' artifacts (loaded in %.1f s)", len(serving.describe()), time.monotonic() - loading)
    processor = BatchProcessor(settings, serving, ClickHouseSink(settings))

    def make_views() -> None:
        # Every registered model's view ahead of its rows: one DDL statement per model,
        # and a thousand of them at a first batch held it ~4 s. A no-op once made; a
        # store that cannot take them now is met again by the batch, which makes what
        # its models miss itself.
        try:
            processor.sink.prepare(serving.specs())
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("could not make the models' views ahead of their rows (%s); each batch makes its own",
                        str(exc)[:300])

    def maintain() -> None:
        serving.maintain()
        make_views()

    progress = Progress()
    app.enricher_progress = progress  # read by tests

    inferences = app.topic(settings.inference_topic, value_serializer="raw", key_serializer="raw",
                           partitions=settings.topic_partitions)
    dead_letters = app.topic(settings.dlq_topic, value_serializer="raw", key_serializer="raw")

    # No agent: the consumer hands this topic's records to the intake (stream/intake.py);
    # adding the topic to the conductor is what subscribes the consumer group to it.
    app.topics.add(inferences)
    intake = RecordIntake(settings.inference_topic, max_records=max(4096, settings.batch_size * 2))
    app.record_intakes = {settings.inference_topic: intake}

    processed: dict[int, int] = {}  # partition -> last offset made durable since its assignment
    lag_series: set[int] = set()

    @app.task
    async def enrich():
        try:
            announce()
            if settings.clickhouse_url.startswith("chdb://"):
                # The embedded store's views before the first batch: they cannot hang the
                # start. (A server's are made by the first refresh tick, or by the batches.)
                # Not before the announce: the store opens here, and `enricher query` must
                # find this worker rather than open the store beside it.
                await asyncio.to_thread(make_views)
            # What is alive now lives as long as the worker: the app, every loaded artifact
            # and pool, the store's client. Kept out of the cycle collector's passes from
            # here on (gc.freeze), which otherwise walk all of it again and again while
            # batches allocate a dict per inference (benchmarks/README.md item 15).
            gc.freeze()
            progress.consuming_at = time.time()
            await enrich_forever()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here would stall the stream silently: stop instead
            log.exception("the batch loop failed; stopping the worker (nothing it had not made durable is "
                          "committed: a restart takes it up again)")
            await app.crash(exc)

    async def enrich_forever():
        while True:
            chunks = await intake.take(settings.batch_size, settings.batch_timeout)
            if progress.first_batch_at is None:
                progress.first_batch_at = time.time()
            # Batched messages make a take of N messages far more than N rows:
            # work through it in pieces of at most ENRICHER_BATCH_BYTES.
            for piece in pieces(chunks, settings.batch_bytes):
                batch = messages(piece)
                outcome = await _handle_until_done(app, processor, batch, settings)
                await deadletters.send(dead_letters, outcome.dead, settings)
                intake.acknowledge(app.consumer, piece)  # durable: Faust may commit these offsets
                processor.count(outcome)
                progress.batches += 1
                progress.consumed += len(batch)
                progress.enriched += sum(outcome.written.values())
                progress.dead_lettered += len(outcome.dead)
                progress.last_batch_at = time.time()
                # Offsets rise within a partition: the last one of each wins (in C, not per row).
                processed.update(zip(batch.partitions, batch.offsets))

    @app.timer(1.0)
    async def export_lag():
        # Lag from the high watermark the fetch responses carry (aiokafka keeps
        # it per partition): no extra request, and right on brokers whose
        # ListOffsets is not (Tansu's). Partitions this worker lost go away.
        try:
            held = {tp.partition: tp for tp in app.consumer.assignment() if tp.topic == settings.inference_topic}
        except Exception:  # noqa: BLE001 - not started or rebalancing: next tick
            return
        for partition in lag_series - held.keys():
            processed.pop(partition, None)
            metrics.CONSUMER_LAG.remove(settings.inference_topic, str(partition))
            metrics.CONSUMER_HIGHWATER.remove(settings.inference_topic, str(partition))
            lag_series.discard(partition)
        committed = getattr(app.consumer, "_committed_offset", {})
        for partition, tp in held.items():
            try:
                highwater = app.consumer.highwater(tp)
            except Exception:  # noqa: BLE001 - assignment moved under us: next tick
                continue
            # The next offset to process: after the last durable one, or before any, the
            # group's committed offset (Faust reads it at assignment and keeps it as Kafka
            # does: the next offset), so a worker stuck from its start (store down) shows lag.
            upcoming = processed[partition] + 1 if partition in processed else committed.get(tp)
            if highwater is None or upcoming is None:
                continue
            labels = (settings.inference_topic, str(partition))
            metrics.CONSUMER_HIGHWATER.labels(*labels).set(highwater)
            metrics.CONSUMER_LAG.labels(*labels).set(max(highwater - upcoming, 0))
            lag_series.add(partition)

    @app.task
    async def hear_announcements():
        # Every worker hears every announcement (no consumer group: partitions
        # are assigned), and refreshes at once; the timer below is the fallback.
        threading.Thread(target=follow_announcements, args=(settings, serving.refresh), name="announcements",
                         daemon=True).start()

    @app.timer(settings.refresh_interval)
    async def refresh_models():
        # Picks up registrations, toggles and newly published artifacts, loads what
        # is enabled ahead of its first batch and pools it, makes new models' views; all off the event loop,
        # and batches switch between runs.
        try:
            await asyncio.to_thread(maintain)
        except Exception:  # noqa: BLE001 - a registry it cannot read now: what serves, serves; try next tick
            log.exception("refreshing models from the registry failed; trying again in %ss",
                          settings.refresh_interval)

    install(app, settings, ControlPlane(registry, store, ControlEvents(settings), Locations.from_settings(settings)),
            serving, progress)

    sweeper = LabelSweeper(processor.sink)

    def holds_first_partition() -> bool:
        # Jobs run once per consumer group, by whoever holds partition 0.
        try:
            assigned = app.consumer.assignment()
        except Exception:  # noqa: BLE001 - not started or rebalancing: next tick
            return False
        return any(tp.topic == settings.inference_topic and tp.partition == 0 for tp in assigned)

    @app.timer(settings.label_sweep_interval)
    async def sweep_labels():
        if holds_first_partition():
            await asyncio.get_running_loop().run_in_executor(sweeper.thread, sweeper.run)

    if settings.drift_interval > 0:
        exporter = ReportExporter(settings, registry)

        @app.timer(settings.drift_interval)
        async def export_drift():
            # Another worker's gauges would repeat this one's: only one exports.
            run = exporter.run if holds_first_partition() else exporter.clear
            await asyncio.get_running_loop().run_in_executor(exporter.thread, run)

    def announce() -> None:
        # Lets `enricher query` reach this process while it holds the embedded store.
        info = {"pid": os.getpid(), "url": f"{scheme(settings)}://{settings.http_host}:{settings.http_port}"}
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        (settings.data_dir / "worker.json").write_text(json.dumps(info))
        log.info("worker ready: consuming %s, dead letters to %s, HTTP on %s",
                 settings.inference_topic, settings.dlq_topic, info["url"])

    return app


async def _handle_until_done(app, processor: BatchProcessor, batch: Messages, settings: Settings) -> Outcome:
    """Handle the batch; while the store cannot take it, try again with backoff.

    Meanwhile the stream waits (no offset moves past rows that are not
    stored) and this worker stops fetching from its partitions, so what it
    holds in memory stays bounded however long the outage; it resumes by
    itself when the store is back. Nothing else is retried here: every other
    failure is dealt with in BatchProcessor.handle.
    """
    delay, paused = 0.5, set()
    try:
        while True:
            try:
                return await asyncio.to_thread(processor.handle, batch)
            except StoreUnavailable as exc:
                metrics.STORE_RETRIES.inc()
                paused |= _pause(app, settings)
                log.error("ClickHouse cannot take the batch (%s); fetching paused, retrying in %.1fs",
                          str(exc)[:300], delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
    finally:
        if paused:
            _resume(app, paused)


def _pause(app, settings: Settings) -> set:
    try:
        assigned = {tp for tp in app.consumer.assignment() if tp.topic == settings.inference_topic}
        app.consumer.pause_partitions(assigned)
        return assigned
    except Exception:  # noqa: BLE001 - not started, or mid-rebalance: the fetch buffer still bounds it
        return set()


def _resume(app, paused: set) -> None:
    try:
        # a rebalance may have moved partitions meanwhile: resume only what is still ours
        app.consumer.resume_partitions(paused & set(app.consumer.assignment()))
        log.info("ClickHouse takes writes again; fetching resumed")
    except Exception:  # noqa: BLE001
        log.exception("could not resume fetching")


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # uvloop's event loop: ~10% less per-message cost in Faust
        import mode.loop

        mode.loop.use("uvloop")
    except ImportError:
        pass
    if not batched_intake():  # the worker has no other path: refuse to start rather than run unchecked code
        raise SystemExit("the installed faust-streaming is not the one the worker's consumer adjustment was "
                         "written against (see the warning above): install faust-streaming==0.15.3")
    check_exposure(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # a fresh machine has none yet
    ensure_topics(settings)
    shorten_fetch_wait(settings.fetch_max_wait_ms)
    app = build_app(settings)
    try:
        EnricherWorker.grace = settings.shutdown_grace
        worker = EnricherWorker(app, loglevel=loglevel, quiet=True)
        worker.execute_from_commandline()
    finally:
        try:
            (settings.data_dir / "worker.json").unlink()
        except FileNotFoundError:
            pass
