"""`enricher demo`: the whole flow on one machine, then what a user wants to see.

Starts the embedded broker, registers a sample model with generated reference
data, turns anomaly detection on and trains it, streams sample inferences
(planted anomalies and malformed messages among them) through a worker until
every one is processed, then queries ClickHouse and the dead-letter topic and
prints a summary. Everything it started, it stops.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from . import deadletters, sample
from .broker import EmbeddedBroker, free_port
from .cli import format_table
from .config import Settings


def say(text: str) -> None:
    print(text, flush=True)


def run_demo(args) -> int:
    from models.registry import ModelRegistry
    from pipelines.train import train

    from .clickhouse import connect, run_query
    from .producer import InferenceProducer
    from .supervise import WorkerProcess
    from .topics import ensure_topics

    data_dir = Path(args.data_dir or ".enricher-demo").resolve()
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    total = args.inferences
    anomalies = max(1, total // 2000)
    max_bytes = 512 * 1024  # the too_large sample message is just over it

    say(f"== 1/6 embedded broker (Tansu), data in {data_dir}")
    broker = EmbeddedBroker(port=args.port or free_port()).start(log_file=open(data_dir / "broker.log", "wb"))
    worker = None
    try:
        settings = Settings.from_env(data_dir=str(data_dir), broker=broker.url, http_port=free_port(),
                                     session_timeout=6.0, max_message_bytes=max_bytes,
                                     clickhouse_url=f"chdb://{data_dir / 'clickhouse'}")
        say(f"   broker at {broker.url}")

        say("== 2/6 register the model (enricher models register)")
        reference_path = data_dir / "reference.parquet"
        pq.write_table(sample.reference_table(10_000), reference_path)
        registry = ModelRegistry(settings.registry_dir)
        spec = registry.register(sample.MODEL_ID, sample.SCHEMA, reference_path)
        say(f"   {spec.model_id}: {spec.task}, features {', '.join(spec.feature_names)}; 10,000 reference rows")

        say("== 3/6 turn anomaly detection on and train it (enrichments set / train)")
        registry.set_enrichment(sample.MODEL_ID, "anomaly_detection", True)
        train(registry, settings.artifacts(), sample.MODEL_ID,
              log=lambda m: say("   " + m))

        say("== 4/6 start a worker (enricher worker)")
        ensure_topics(settings)
        worker = WorkerProcess(settings, log_path=data_dir / "worker.log").start()
        worker.wait_for(lambda s: True, timeout=60)
        say(f"   worker up, HTTP {worker.url} (/metrics, /status); log {data_dir / 'worker.log'}")

        say(f"== 5/6 stream {total:,} inferences ({anomalies} planted anomalies, "
            f"{len(sample.malformed())} malformed)")
        messages, planted = sample.inferences(total, anomalies=anomalies)
        bad = sample.malformed(max_bytes=max_bytes)
        # Valid inferences go batched, 1000 to a message (JSON arrays: the producer's
        # default); the malformed ones alone, spread through the stream.
        producer = InferenceProducer(settings, batch="json", batch_rows=1000)
        started = time.monotonic()
        chunk = 10_000
        for k, i in enumerate(range(0, len(messages), chunk)):
            producer.send_many(messages[i:i + chunk])
            if k < len(bad):
                producer.send_alone(bad[k][0])
            _progress("produced", min(i + chunk, len(messages)), len(messages), started)
        for raw, _ in bad[k + 1:]:
            producer.send_alone(raw)
        producer.flush()
        sent = producer.messages
        del producer  # closes its connections before the broker goes away
        _progress_end()

        def show(status):
            _progress("processed", status["enriched"] + status["dead_lettered"], total + len(bad), started)

        final = worker.wait_for(lambda s: s["enriched"] + s["dead_lettered"] >= total + len(bad),
                                timeout=max(120, total / 500), on_status=show)
        elapsed = time.monotonic() - started
        _progress_end()
        say(f"   {final['enriched']:,} enriched, {final['dead_lettered']} dead-lettered in {elapsed:.1f}s "
            f"({(total + len(bad)) / elapsed:,.0f} inferences/s end to end on this machine, "
            f"{sent:,} Kafka messages)")
        worker.stop()
        worker = None

        say("== 6/6 results, queried from ClickHouse (enricher query) and the dead-letter topic")
        client = connect(settings, readonly=True)
        db = settings.clickhouse_database

        def show_query(title, sql):
            columns, rows = run_query(client, sql)
            say(f"\n-- {title}\n   {sql}\n")
            say(format_table(columns, rows))

        show_query("rows per model", f"SELECT '{sample.MODEL_ID}' AS model, count() AS rows, "
                   f"uniqExact(inference_id) AS distinct_ids FROM {db}.{sample.MODEL_ID}")
        reasons = Counter(r.reason for r in deadletters.read(settings, final["dead_lettered"]))
        say("\n-- dead letters by reason (topic %s)\n" % settings.dlq_topic)
        say(format_table(["reason", "count"], sorted(reasons.items())))
        show_query("anomaly_score distribution",
                   f"SELECT round(min(anomaly_score), 3) AS min, round(quantile(0.5)(anomaly_score), 3) AS p50, "
                   f"round(quantile(0.99)(anomaly_score), 3) AS p99, round(max(anomaly_score), 3) AS max, "
                   f"countIf(anomaly_score > 0.6) AS above_0_6, any(anomaly_detection_version) AS artifact_version "
                   f"FROM {db}.{sample.MODEL_ID}")
        show_query("histogram", f"SELECT floor(anomaly_score, 1) AS bucket, count() AS rows, "
                   f"bar(log10(count()), 0, 6, 30) AS log_scale FROM {db}.{sample.MODEL_ID} "
                   f"GROUP BY bucket ORDER BY bucket")
        columns, rows = run_query(client, f"SELECT inference_id, round(anomaly_score, 3) AS anomaly_score, "
                                  f"round(f0, 2) AS f0, round(f1, 2) AS f1, region, anomaly_detection_version "
                                  f"FROM {db}.{sample.MODEL_ID} ORDER BY anomaly_score DESC LIMIT 10")
        say("\n-- top anomalies (* = planted)\n")
        say(format_table(columns + ["planted"], [r + ("*" if r[0] in planted else "",) for r in rows]))
        _, top = run_query(client, f"SELECT inference_id FROM {db}.{sample.MODEL_ID} "
                           f"ORDER BY anomaly_score DESC LIMIT {len(planted)}")
        found = len(planted & {r[0] for r in top})
        say(f"\n{found} of {len(planted)} planted anomalies are the top-{len(planted)} scores.")
        client.close()
        say(f"\nQuery it yourself: {Path(sys.executable).parent / 'enricher'} --data-dir {data_dir} query "
            f"\"SELECT * FROM {db}.{sample.MODEL_ID} ORDER BY anomaly_score DESC LIMIT 5\"")
        return 0
    finally:
        if worker is not None:
            worker.stop()
        broker.stop()


_last_shown = {"line": None}


def _progress(what: str, done: int, total: int, started: float) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    rate = done / max(time.monotonic() - started, 1e-6)
    line = f"   {what:<9} [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} ({rate:,.0f}/s)"
    if sys.stdout.isatty():
        sys.stdout.write("\r" + line + "   ")
    elif (what, filled // 3) != _last_shown["line"]:  # a log file gets one line per 10%
        sys.stdout.write(line + "\n")
        _last_shown["line"] = (what, filled // 3)
    sys.stdout.flush()


def _progress_end() -> None:
    if sys.stdout.isatty():
        sys.stdout.write("\n")

