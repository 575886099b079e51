"""`enricher demo`: the whole toggle-driven flow on one machine, then what a user wants to see.

Starts the embedded broker, a worker and the trigger (local runner); registers
a sample model through the worker's API; streams inferences while every
enrichment is off (rows land with NULL scores); turns all four on (anomaly
detection, explanations, bias mitigation, hotspots) with one PATCH; the
trigger builds and runs the training workflow, the artifacts are published,
the worker swaps them in without stopping; streams more inferences (planted
anomalies and malformed messages among them), then their labels, late, as
label updates; and shows the columns that appeared and the three label-driven
reports (performance, fairness, hotspots), all queried back from ClickHouse
and the dead-letter topic. Everything it started, it stops.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from enricher import sample
from enricher.broker import EmbeddedBroker, free_port
from enricher.config import Settings
from enricher.errors import UserError
from enricher.store.query import format_table, query, report, report_text
from enricher.stream import deadletters
from enricher.stream.producer import InferenceProducer
from enricher.stream.topics import ensure_topics
from enricher.supervise import TriggerProcess, WorkerProcess


def say(text: str) -> None:
    print(text, flush=True)


def api(url: str, method: str = "GET", body=None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


MARKER = ".enricher-demo"  # in a data directory the demo made, so that it may remove it again
# What a demo run leaves in its directory (runs before the marker existed left exactly these).
DEMO_ENTRIES = {MARKER, "broker.log", "worker.log", "trigger.log", "reference.parquet", "registry", "artifacts",
                "clickhouse", "faust", "worker.json"}


def prepare_data_dir(data_dir: Path) -> Path:
    """A fresh data directory for the demo. A previous demo's (it holds the
    marker) is removed; an empty one is used; anything else is refused: the
    demo never deletes data it did not create."""
    if data_dir.exists():
        if not data_dir.is_dir():
            raise UserError(f"--data-dir {data_dir} is a file; give a new or empty directory")
        entries = {p.name for p in data_dir.iterdir()}
        if (data_dir / MARKER).is_file() and entries <= DEMO_ENTRIES:
            shutil.rmtree(data_dir)
        elif entries and not entries <= DEMO_ENTRIES - {MARKER}:
            raise UserError(f"--data-dir {data_dir} holds files the demo did not create "
                            f"({', '.join(sorted(entries - DEMO_ENTRIES)[:5])}); the demo starts from an empty "
                            "directory and removes it again on its next run, so give a new or empty one")
        elif entries:  # a demo's from before the marker: only what a demo leaves
            shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / MARKER).write_text("made by `enricher demo`; the next demo run removes this directory\n")
    return data_dir


def run_demo(args) -> int:
    data_dir = prepare_data_dir(Path(args.data_dir or ".enricher-demo").resolve())
    total = args.inferences
    before, after = total // 5, total - total // 5  # streamed before / after the toggle
    anomalies = max(1, after // 2000)
    max_bytes = 512 * 1024  # the too_large sample message is just over it

    def on_sigterm(*_):  # as Ctrl-C: the `finally` below stops everything the demo started
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    say(f"== 1/7 embedded broker (Tansu), data in {data_dir}")
    broker = EmbeddedBroker(port=args.port or free_port()).start(log_file=open(data_dir / "broker.log", "wb"))
    worker = trigger = None
    try:
        settings = Settings.from_env(data_dir=str(data_dir), broker=broker.url, http_port=free_port(),
                                     session_timeout=6.0, max_message_bytes=max_bytes, refresh_interval=0.5,
                                     label_sweep_interval=1.0,
                                     clickhouse_url=f"chdb://{data_dir / 'clickhouse'}",
                                     # the reference is registered through the worker's API: from here only
                                     reference_roots=str(data_dir))
        say(f"   broker at {broker.url}")

        say("== 2/7 start a worker (enricher worker) and the trigger (enricher trigger, local runner)")
        ensure_topics(settings)
        worker = WorkerProcess(settings, log_path=data_dir / "worker.log").start()
        trigger = TriggerProcess(settings, log_path=data_dir / "trigger.log").start()
        worker.wait_for(lambda s: True, timeout=60)
        say(f"   worker HTTP {worker.url} (API, /metrics, /status); logs in {data_dir}")

        say(f"== 3/7 register the model: PUT {worker.url}/models/{sample.MODEL_ID}")
        reference_path = data_dir / "reference.parquet"
        pq.write_table(sample.reference_table(10_000), reference_path)
        doc = api(f"{worker.url}/models/{sample.MODEL_ID}", "PUT",
                  {"schema": sample.SCHEMA, "reference": str(reference_path)})
        say(f"   {doc['model_id']}: {doc['task']}, {doc['features']} features, 10,000 reference rows; "
            f"enrichments {doc['enrichments']}")

        producer = InferenceProducer(settings, batch="json", batch_rows=1000)
        bad = sample.malformed(max_bytes=max_bytes)
        say(f"== 4/7 stream {before:,} inferences with every enrichment off")
        first, _ = sample.inferences(before, id_prefix="before", labels=[])  # scored by the sample model
        producer.send_many(first)
        producer.flush()
        worker.wait_for(lambda s: s["enriched"] >= before, timeout=max(120, before / 500))
        say(f"   {before:,} rows written, anomaly_score NULL (off)")

        say(f"== 5/7 turn all four enrichments on with one PATCH {worker.url}/models/{sample.MODEL_ID}"
            "/enrichments")
        toggled = time.monotonic()
        names = ("anomaly_detection", "explainability", "bias_mitigation", "hotspots")
        doc = api(f"{worker.url}/models/{sample.MODEL_ID}/enrichments", "PATCH",
                  {"anomaly_detection": {"enabled": True, "config": {"n_estimators": 100}},
                   "explainability": {"enabled": True}, "bias_mitigation": {"enabled": True},
                   "hotspots": {"enabled": True}})
        say(f"   status {doc['anomaly_detection']['status']}; the trigger builds the workflow "
            "(prepare -> per enrichment: train -> validate -> publish) and runs it")
        seen = None
        while True:
            states = api(f"{worker.url}/models/{sample.MODEL_ID}/enrichments")
            now = tuple(states[n]["status"] for n in names)
            if now != seen:
                say(f"   {time.monotonic() - toggled:5.1f}s  " + ", ".join(f"{n} {st}" for n, st in zip(names, now)))
                seen = now
            if all(st in ("ready", "failed") for st in now) or time.monotonic() - toggled > 300:
                break
            time.sleep(0.25)
        if any(states[n]["status"] != "ready" for n in names):
            say(f"   training did not finish: {states}; see {data_dir / 'trigger.log'}")
            return 1
        worker.wait_for(lambda s: all(s["serving"].get(sample.MODEL_ID, {}).get(n) for n in names), timeout=60)
        quality = {n: states[n]["quality"] or {} for n in names}
        say(f"   {time.monotonic() - toggled:5.1f}s  the worker serves "
            + ", ".join(f"{n} v{states[n]['version']}" for n in names)
            + f" from one workflow ({states[names[0]]['workflow']}); hot swap, no restart")
        say(f"   explanations: surrogate fidelity {quality['explainability']['metric']} "
            f"{quality['explainability']['fidelity']:.3f} on {quality['explainability']['holdout_rows']:,} held-out "
            f"reference rows; hotspots: {quality['hotspots'].get('hotspots', 0)} found in "
            f"{quality['hotspots'].get('rows', 0):,} labelled reference rows")
        curves = api(f"{worker.url}/models/{sample.MODEL_ID}/bias/curves")
        chosen = curves["chosen"]
        point, raw = curves["curves"][chosen["constraint"]][chosen["index"]], curves["raw"][chosen["constraint"]]
        say(f"   bias mitigation on {curves['attribute']!r} ({curves['mode']}): {chosen['constraint']}, point "
            f"{chosen['index']} of {len(curves['curves'][chosen['constraint']])} on its curve: gap {point['gap']:.3f} "
            f"at accuracy {point['accuracy']:.3f} on the reference (the raw decision: gap {raw['gap']:.3f}, "
            f"accuracy {raw['accuracy']:.3f})")

        labels: list[bytes] = []
        say(f"== 6/7 stream {after:,} more inferences ({anomalies} planted anomalies, "
            f"{len(bad)} malformed messages), then 80% of their labels, late")
        messages, planted = sample.inferences(after, anomalies=anomalies, seed=12, id_prefix="after",
                                              labels=labels)
        started = time.monotonic()  # this step's clock: its rates count its own rows and seconds
        chunk = 10_000
        for k, i in enumerate(range(0, len(messages), chunk)):
            producer.send_many(messages[i:i + chunk])
            if k < len(bad):
                producer.send_alone(bad[k][0])
            _progress("produced", min(i + chunk, len(messages)), len(messages), started)
        for raw, _ in bad[k + 1:]:
            producer.send_alone(raw)
        producer.flush()
        _progress_end()

        def show(status):
            _progress("processed", status["enriched"] + status["dead_lettered"], total + len(bad), started, before)

        final = worker.wait_for(lambda s: s["enriched"] + s["dead_lettered"] >= total + len(bad),
                                timeout=max(120, total / 500), on_status=show)
        _progress_end()
        # Labels come later than their inferences; the worker's label sweep brings them to their rows.
        late = [raw for i, raw in enumerate(labels) if i % 5]
        producer.send_many(late)
        producer.flush()
        sent = producer.messages
        del producer  # closes its connections before the broker goes away
        view = f"{settings.clickhouse_database}.{sample.MODEL_ID}"
        deadline = time.monotonic() + max(120, len(late) / 500)
        while time.monotonic() < deadline:
            labelled = query(settings, f"SELECT countIf(label IS NOT NULL) FROM {view}")[1][0][0]
            if labelled >= len(late):
                break
            time.sleep(0.5)
        say(f"   {final['enriched']:,} enriched, {final['dead_lettered']} dead-lettered in all; "
            f"{labelled:,} of {len(late):,} late labels reached their rows ({sent:,} Kafka messages)")
        worker.stop()
        worker = None

        say("== 7/7 results, queried from ClickHouse (enricher query) and the dead-letter topic")
        db = settings.clickhouse_database

        def show_query(title, sql):
            columns, rows = query(settings, sql)
            say(f"\n-- {title}\n   {sql}\n")
            say(format_table(columns, rows))

        show_query("rows by when they arrived: the columns appeared with the toggle",
                   f"SELECT splitByChar('-', inference_id)[1] AS streamed, count() AS rows, "
                   f"uniqExact(inference_id) AS distinct_ids, countIf(anomaly_score IS NOT NULL) AS scored, "
                   f"any(anomaly_detection_version) AS artifact_version FROM {db}.{sample.MODEL_ID} "
                   f"GROUP BY streamed ORDER BY streamed DESC")
        reasons = Counter(r.reason for r in deadletters.read(settings, final["dead_lettered"]))
        say("\n-- dead letters by reason (topic %s)\n" % settings.dlq_topic)
        say(format_table(["reason", "count"], sorted(reasons.items())))
        show_query("anomaly_score distribution",
                   f"SELECT round(min(anomaly_score), 3) AS min, round(quantile(0.5)(anomaly_score), 3) AS p50, "
                   f"round(quantile(0.99)(anomaly_score), 3) AS p99, round(max(anomaly_score), 3) AS max, "
                   f"countIf(anomaly_score > 0.6) AS above_0_6 FROM {db}.{sample.MODEL_ID} "
                   f"WHERE anomaly_score IS NOT NULL")
        columns, rows = query(settings, f"SELECT inference_id, round(anomaly_score, 3) AS anomaly_score, "
                                  f"round(f0, 2) AS f0, round(f1, 2) AS f1, region, anomaly_detection_version "
                                  f"FROM {db}.{sample.MODEL_ID} ORDER BY anomaly_score DESC NULLS LAST LIMIT 10")
        say("\n-- top anomalies (* = planted)\n")
        say(format_table(columns + ["planted"], [r + ("*" if r[0] in planted else "",) for r in rows]))
        _, top = query(settings, f"SELECT inference_id FROM {db}.{sample.MODEL_ID} "
                           f"ORDER BY anomaly_score DESC NULLS LAST LIMIT {len(planted)}")
        found = len(planted & {r[0] for r in top})
        say(f"\n{found} of {len(planted)} planted anomalies are the top-{len(planted)} scores.")
        features = [c["name"] for c in sample.SCHEMA["features"]]
        show_query("what drives the model: mean |attribution| per feature (global importance), and every row's "
                   "check (base value + attributions = explained output)",
                   "SELECT " + ", ".join(f"round(avg(abs(explanation_{f})), 4) AS {f}" for f in features)
                   + ", max(abs(" + " + ".join(f"explanation_{f}" for f in features)
                   + " + explanation_base_value - explanation_output)) AS worst_sum_error, count() AS explained "
                   f"FROM {db}.{sample.MODEL_ID} WHERE explanation_output IS NOT NULL")
        show_query("the top anomalies explained: the model's prediction, the surrogate's output the attributions "
                   "add up to (far outside the reference data the two part: compare them per row), and the "
                   "attributions of the features that drive the model",
                   f"SELECT inference_id, round(prediction, 3) AS prediction, round(explanation_output, 3) AS "
                   f"explained, round(explanation_base_value, 3) AS base, round(explanation_f0, 3) AS f0, "
                   f"round(explanation_f3, 3) AS f3, round(explanation_region, 3) AS region, "
                   f"explainability_version FROM {db}.{sample.MODEL_ID} ORDER BY anomaly_score DESC NULLS LAST "
                   "LIMIT 3")
        show_query("every row says which artifact version made each enrichment's values",
                   f"SELECT anomaly_detection_version AS anomaly, explainability_version AS explanations, "
                   f"bias_mitigation_version AS bias, hotspots_version AS hotspots, count() AS rows, "
                   f"countIf(bias_mitigated_prediction IS NOT NULL) AS bias_decided, "
                   f"countIf(hotspot_id IS NOT NULL) AS in_a_hotspot FROM {db}.{sample.MODEL_ID} "
                   f"GROUP BY ALL ORDER BY ALL")
        for name, options, title in (
                ("performance", {"by": "region"}, "performance on the labelled rows, by region (enricher "
                 "performance ID --by region)"),
                ("fairness", {}, "fairness: raw decision against bias_mitigated_prediction (enricher fairness ID)"),
                ("hotspots", {}, "hotspots: where the model is often wrong (enricher hotspots ID)")):
            say(f"\n-- {title}\n")
            say(report_text(name, report(settings, name, sample.MODEL_ID, "1d", options=options)))
        cli = Path(sys.executable).parent / "enricher"
        say(f"\nQuery it yourself: {cli} --data-dir {data_dir} query "
            f"\"SELECT * FROM {db}.{sample.MODEL_ID} ORDER BY anomaly_score DESC LIMIT 5\"")
        return 0
    except KeyboardInterrupt:
        say("\n   interrupted: stopping what the demo started")
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if worker is not None:
            worker.stop()
        if trigger is not None:
            trigger.stop()
        broker.stop()


_last_shown = {"line": None}


def _progress(what: str, done: int, total: int, started: float, since: int = 0) -> None:
    """A progress bar; the rate counts what was done since `started` (`done - since` rows)."""
    width = 30
    filled = int(width * done / max(total, 1))
    rate = (done - since) / max(time.monotonic() - started, 1e-6)
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

