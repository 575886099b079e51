"""Rows per second through each stage of the batch path, no broker involved.

Measures, on the sample model (10 numeric + 1 categorical feature, Isolation
Forest of 100 trees), for batches of BATCH messages:
  parse      raw JSON bytes -> validated columnar batch
  transform  the anomaly artifact on that batch
  library    IsolationForest.score_samples on the same matrix (the floor)
  insert     the enriched Arrow table into chDB
Prints a table and writes benchmarks/results/batch_path.json. Numbers are
specific to the machine; compare stages with each other, not across machines.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from enricher import sample  # noqa: E402
from enricher.clickhouse import EnrichedTables, connect  # noqa: E402
from enricher.config import Settings  # noqa: E402
from enricher.contract import parse_batch  # noqa: E402
from enricher.enrich import enrich  # noqa: E402
from enricher.serving import Active  # noqa: E402
from models import ENRICHMENTS  # noqa: E402
from models.enrichment import FeatureBatch  # noqa: E402
from models.reference import normalise  # noqa: E402
from models.spec import ModelSpec  # noqa: E402

BATCH = int(os.environ.get("BENCH_BATCH", 5000))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 10))


def best(fn, rounds=ROUNDS) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    spec = ModelSpec.from_json(sample.MODEL_ID, sample.SCHEMA)
    ad = ENRICHMENTS["anomaly_detection"]
    fitted = ad.fit(spec, normalise(spec, sample.reference_table(10_000)), {})
    msgs, _ = sample.inferences(BATCH, anomalies=5)
    parts, offs = [0] * BATCH, list(range(BATCH))
    lookup = {spec.model_id: spec}.get

    def parse():
        return parse_batch(msgs, parts, offs, lookup, 1 << 20)

    rows = parse().models[spec.model_id]
    batch = FeatureBatch(rows.values, rows.num_rows)
    X = fitted.encoder.transform(batch.columns, batch.num_rows)
    with tempfile.TemporaryDirectory() as tmp:
        tables = EnrichedTables(connect(Settings.from_env(env={}, data_dir=tmp)), "enricher")
        layout = tables.ensure(spec)
        active = {"anomaly_detection": Active("anomaly_detection", 1, fitted)}
        table = enrich(rows, active, layout, time.time_ns() // 1000)
        stages = {
            "parse": best(parse),
            "transform": best(lambda: fitted.transform(batch)),
            "library": best(lambda: fitted.forest.score_samples(X)),
            "enrich (table)": best(lambda: enrich(rows, active, layout, 0)),
            "insert": best(lambda: tables.insert(spec, table)),
        }
    results = {"batch": BATCH, "rows_per_second": {k: round(BATCH / v) for k, v in stages.items()},
               "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()},
               "message_bytes_mean": round(sum(map(len, msgs)) / len(msgs))}
    print(f"batch of {BATCH} messages, ~{results['message_bytes_mean']} bytes each, {os.cpu_count()} cores")
    for k, v in results["rows_per_second"].items():
        print(f"  {k:<15} {v:>12,} rows/s")
    out = Path(__file__).parent / "results" / "batch_path.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
