"""Issue 9, step one: measure candidate storage layouts before choosing one.

    python benchmarks/layouts.py [--models 20] [--rows-per-model 50000] [--days 30]

The same rows (models x rows over `days`, 10 numeric features and one
categorical, an anomaly score) are written in the chDB engine three ways, and
the analyst queries of issue 9 are timed on one model in each (median of 5):

- `current`: the product's storage table as the product writes it (when the
  committed results were taken: layout v1, ReplacingMergeTree ORDER BY
  (model_id, inference_id), features in maps; since, layout v2, see
  enricher/store/clickhouse.py and the query section of `make bench`), read through
  the model's view, written by the product's own `enrich_many` and
  `EnrichedTables.insert`;
- `typed`: one table for the layout with a typed column per feature,
  ReplacingMergeTree ORDER BY (model_id, timestamp, inference_id), daily
  partitions, read with FINAL;
- `typed` read with FINAL per partition
  (`do_not_merge_across_partitions_select_final=1`: copies of a row share its
  day, so merging within a partition is enough), and without FINAL (the
  physical best, what issue 9's targets are measured against);
- `json`: the features in one ClickHouse `JSON` column, the same key and
  partitions.

Writes benchmarks/results/layouts.{json,md}. Nothing here is product code:
it is the measurement the layout choice is to be made on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from enricher.models.spec import ModelSpec  # noqa: E402

from enricher import sample  # noqa: E402
from enricher.store.clickhouse import EnrichedTables  # noqa: E402
from enricher.stream.contract import TS_TYPE, ModelRows  # noqa: E402
from enricher.stream.enrich import enrich_many  # noqa: E402

SCHEMA = {**sample.SCHEMA, "attributes": []}
DAY_MS = 86_400_000


def rows_for(model_id: str, n: int, days: int, now_ms: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    cols = {name: rng.normal(i * 0.5, 1 + 0.1 * i, n) for i, name in enumerate(sample.NUMERIC)}
    cols["region"] = rng.choice(sample.REGIONS, n, p=sample.REGION_P)
    cols["timestamp"] = np.sort(rng.integers(now_ms - days * DAY_MS, now_ms, n))
    cols["anomaly_score"] = np.clip(rng.normal(0.45, 0.05, n), 0, 1)
    cols["inference_id"] = np.array([f"{model_id}-{i:08d}" for i in range(n)])
    cols["prediction"] = rng.random(n)
    return cols


def current_table(spec: ModelSpec, cols: dict, n: int) -> pa.Table:
    values = {name: pa.array(cols[name]) for name in sample.NUMERIC}
    values["region"] = pa.array(cols["region"])
    rows = ModelRows(spec, pa.array(cols["inference_id"]), pa.array(cols["timestamp"]).cast(TS_TYPE),
                     pa.array(cols["prediction"]), pa.nulls(n, pa.float64()), values,
                     np.zeros(n, np.uint32), np.arange(n, dtype=np.uint64), np.arange(n, dtype=np.int64))
    table = enrich_many([(rows, {})], time.time_ns() // 1000)
    at = table.column_names.index("anomaly_score")
    table = table.set_column(at, "anomaly_score", pa.array(cols["anomaly_score"]))
    return table.set_column(table.column_names.index("anomaly_detection_version"), "anomaly_detection_version",
                            pa.array(np.ones(n, np.uint32)))


def typed_table(model_id: str, cols: dict, n: int) -> pa.Table:
    data = {"model_id": pa.array([model_id] * n), "inference_id": pa.array(cols["inference_id"]),
            "timestamp": pa.array(cols["timestamp"]).cast(TS_TYPE)}
    data.update({name: pa.array(cols[name]) for name in sample.NUMERIC})
    data["region"] = pa.array(cols["region"])
    data["prediction"] = pa.array(cols["prediction"])
    data["anomaly_score"] = pa.array(cols["anomaly_score"])
    return pa.table(data)


def json_table(model_id: str, cols: dict, n: int) -> pa.Table:
    features = [json.dumps({**{name: float(cols[name][i]) for name in sample.NUMERIC},
                            "region": str(cols["region"][i])}) for i in range(n)]
    return pa.table({"model_id": pa.array([model_id] * n), "inference_id": pa.array(cols["inference_id"]),
                     "timestamp": pa.array(cols["timestamp"]).cast(TS_TYPE), "features": pa.array(features),
                     "prediction": pa.array(cols["prediction"]), "anomaly_score": pa.array(cols["anomaly_score"])})


def queries(source: str, f0: str, model: str | None) -> dict[str, str]:
    where = f"model_id = '{model}' AND " if model else ""
    last_day = f"{where}timestamp >= now64(3) - INTERVAL 1 DAY"
    all_rows = f"WHERE model_id = '{model}'" if model else ""
    return {
        "last day: avg of one feature, anomaly rate":
            f"SELECT avg({f0}), avg(anomaly_score > 0.6) FROM {source} WHERE {last_day}",
        "last day: top 10 anomalies":
            f"SELECT inference_id, anomaly_score FROM {source} WHERE {last_day} ORDER BY anomaly_score DESC LIMIT 10",
        "30 days: hourly anomaly rate":
            f"SELECT toStartOfHour(timestamp) AS h, avg(anomaly_score > 0.6) FROM {source} "
            f"{'WHERE ' + where[:-5] if model else ''} GROUP BY h ORDER BY h",
        "all time: histogram of one feature":
            f"SELECT floor({f0} * 4) / 4 AS bin, count() FROM {source} {all_rows} GROUP BY bin ORDER BY bin",
    }


def timed(client, sql: str, settings: dict | None = None, repeat: int = 5) -> float:
    client.query(sql, settings=settings)  # warm
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        client.query(sql, settings=settings)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs) * 1000


def main() -> int:
    import clickhouse_connect

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--rows-per-model", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="enricher-layouts-"))
    client = clickhouse_connect.get_client(interface="chdb", path=str(tmp / "ch"))
    spec_doc = SCHEMA
    now_ms = int(time.time() * 1000)
    tables = EnrichedTables(client, "enricher")
    cols_ddl = ", ".join(f"`{n}` Float64" for n in sample.NUMERIC)
    client.command("CREATE DATABASE IF NOT EXISTS layouts")
    key = "ENGINE = ReplacingMergeTree ORDER BY (model_id, timestamp, inference_id) PARTITION BY toDate(timestamp)"
    client.command(f"CREATE TABLE layouts.typed (model_id LowCardinality(String), inference_id String, "
                   f"timestamp DateTime64(3, 'UTC'), {cols_ddl}, region LowCardinality(String), "
                   f"prediction Float64, anomaly_score Nullable(Float64)) {key}")
    client.command(f"CREATE TABLE layouts.json (model_id LowCardinality(String), inference_id String, "
                   f"timestamp DateTime64(3, 'UTC'), features JSON, prediction Float64, "
                   f"anomaly_score Nullable(Float64)) {key}")
    written = {"current": 0.0, "typed": 0.0, "json": 0.0}
    for m in range(args.models):
        model_id = f"model_{m:03d}"
        spec = ModelSpec.from_json(model_id, spec_doc)
        tables.ensure_view(spec)
        cols = rows_for(model_id, args.rows_per_model, args.days, now_ms, seed=m)
        n = args.rows_per_model
        for name, build, target in (("current", lambda: current_table(spec, cols, n), tables.table),
                                    ("typed", lambda: typed_table(model_id, cols, n), "layouts.typed"),
                                    ("json", lambda: json_table(model_id, cols, n), "layouts.json")):
            table = build()
            started = time.perf_counter()
            client.insert_arrow(target, table)
            written[name] += time.perf_counter() - started
        print(f"wrote {model_id}", flush=True)
    model = f"model_{min(7, args.models - 1):03d}"
    per_partition = {"do_not_merge_across_partitions_select_final": 1}
    sources = {"current": (f"enricher.{model}", "f0", None, None),
               "typed": ("layouts.typed FINAL", "f0", model, None),
               "typed_partition_final": ("layouts.typed FINAL", "f0", model, per_partition),
               "typed_no_final": ("layouts.typed", "f0", model, None),
               "json": ("layouts.json FINAL", "features.f0::Float64", model, None)}
    results = {"rows": args.models * args.rows_per_model, "models": args.models, "days": args.days,
               "insert_seconds": {k: round(v, 2) for k, v in written.items()}, "queries": {}}
    for layout, (source, f0, m, settings) in sources.items():
        for title, sql in queries(source, f0, m).items():
            results["queries"].setdefault(title, {})[layout] = round(timed(client, sql, settings), 1)
    lines = [f"# Storage layouts measured ({results['rows']:,} rows: {args.models} models x "
             f"{args.rows_per_model:,} over {args.days} days; chDB 26.9; one model queried; median of 5)", "",
             "| query | current (view, FINAL) | typed, FINAL | typed, FINAL per partition | typed, no FINAL "
             "(the physical best) | JSON, FINAL | current / best |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for title, by in results["queries"].items():
        lines.append(f"| {title} | {by['current']} ms | {by['typed']} ms | {by['typed_partition_final']} ms | "
                     f"{by['typed_no_final']} ms | {by['json']} ms | {by['current'] / by['typed_no_final']:.1f}x |")
    lines += ["", "Insert time, all models: " + ", ".join(f"{k} {v} s" for k, v in results["insert_seconds"].items()),
              "", "Command: `python benchmarks/layouts.py " + " ".join(sys.argv[1:]) + "`"]
    out = ROOT / "benchmarks" / "results"
    (out / "layouts.json").write_text(json.dumps(results, indent=2))
    (out / "layouts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
