"""The reference pipelines our worker is compared with, written as a user would.

    python benchmarks/pipes.py raw  BROKER TOPIC N CHDB_DIR [orjson|pyarrow]
    python benchmarks/pipes.py faust BROKER TOPIC N CHDB_DIR HTTP_PORT MODEL_DIR

`raw`: no Faust, no enrichment: confluent-kafka batch consume -> parse ->
Arrow -> one insert_arrow per batch. The limit of the pipe.

`faust`: a straightforward batched Faust agent: `stream.take(5000,
within=0.5)`, orjson, vectorised Isolation Forest scoring, one insert_arrow
per batch. What a user would write by hand.

Each writes CHDB_DIR.result.json: {"rows": N, "seconds": ..., "rows_per_second": ...},
timed from the first message received to the last row inserted.
"""

from __future__ import annotations

import io
import json
import sys
import time

import numpy as np
import orjson
import pyarrow as pa

FEATURES = [f"f{i}" for i in range(10)]
DDL = ("CREATE TABLE IF NOT EXISTS bench.rows (inference_id String, timestamp DateTime64(3, 'UTC'), "
       + ", ".join(f"{f} Float64" for f in FEATURES)
       + ", region LowCardinality(String), prediction Float64, anomaly_score Nullable(Float64)) "
         "ENGINE = MergeTree ORDER BY inference_id")


def _client(path):
    import clickhouse_connect

    client = clickhouse_connect.get_client(interface="chdb", path=path)
    client.command("CREATE DATABASE IF NOT EXISTS bench")
    client.command(DDL)
    return client


def _table_from_objects(objs: list[dict], scores=None) -> pa.Table:
    cols = {"inference_id": pa.array([o["inference_id"] for o in objs]),
            "timestamp": pa.array([o["timestamp"] for o in objs], pa.int64()).cast(pa.timestamp("ms", "UTC"))}
    feats = [o["features"] for o in objs]
    for f in FEATURES:
        cols[f] = pa.array([x[f] for x in feats], pa.float64())
    cols["region"] = pa.array([x["region"] for x in feats])
    cols["prediction"] = pa.array([o["prediction"] for o in objs], pa.float64())
    cols["anomaly_score"] = pa.array(scores if scores is not None else [None] * len(objs), pa.float64())
    return pa.table(cols)


def raw(broker: str, topic: str, n: int, path: str, parser: str = "orjson") -> dict:
    from confluent_kafka import Consumer

    client = _client(path)
    consumer = Consumer({"bootstrap.servers": broker, "group.id": "raw-pipe", "auto.offset.reset": "earliest",
                         "enable.auto.commit": False, "session.timeout.ms": 6000,
                         "fetch.max.bytes": 52428800, "queued.max.messages.kbytes": 262144})
    consumer.subscribe([topic])
    done, started = 0, None
    while done < n:
        msgs = consumer.consume(10000, timeout=0.5)
        if not msgs:
            continue
        if started is None:
            started = time.perf_counter()
        values = [m.value() for m in msgs if not m.error()]
        if parser == "pyarrow":
            import pyarrow.json as pajson

            parsed = pajson.read_json(io.BytesIO(b"\n".join(values)))
            feats = parsed.column("features").combine_chunks()
            table = pa.table({"inference_id": parsed.column("inference_id"),
                              "timestamp": parsed.column("timestamp").cast(pa.timestamp("ms", "UTC")),
                              **{f: feats.field(f) for f in FEATURES}, "region": feats.field("region"),
                              "prediction": parsed.column("prediction"),
                              "anomaly_score": pa.nulls(parsed.num_rows, pa.float64())})
        else:
            table = _table_from_objects([orjson.loads(v) for v in values])
        client.insert_arrow("bench.rows", table)
        consumer.commit(asynchronous=True)
        done += len(values)
    seconds = time.perf_counter() - started
    consumer.close()
    return {"rows": done, "seconds": seconds, "rows_per_second": done / seconds}


def faust_agent(broker: str, topic: str, n: int, path: str, port: int, model_dir: str) -> dict:
    import pickle

    import faust

    forest = pickle.loads(open(f"{model_dir}/forest.pkl", "rb").read())  # written by this benchmark
    encoder = json.loads(open(f"{model_dir}/encoder.json").read())
    freq = dict(zip(encoder["categories"]["region"], encoder["frequencies"]["region"]))
    client = _client(path)
    app = faust.App("faust-reference", broker=f"kafka://{broker}", value_serializer="raw",
                    broker_session_timeout=6, web_port=port, web_bind="127.0.0.1",
                    datadir=f"{path}-faust", consumer_auto_offset_reset="earliest")
    source = app.topic(topic, value_serializer="raw")
    state = {"done": 0, "started": None, "result": None}

    @app.agent(source)
    async def score(stream):
        async for values in stream.take(5000, within=0.5):
            if state["started"] is None:
                state["started"] = time.perf_counter()
            objs = [orjson.loads(v) for v in values]
            X = np.array([[o["features"][f] for f in FEATURES] + [freq.get(o["features"]["region"], 0.0)]
                          for o in objs], dtype=np.float32)
            table = _table_from_objects(objs, -forest.score_samples(X))
            client.insert_arrow("bench.rows", table)
            state["done"] += len(values)
            if state["done"] >= n and state["result"] is None:
                seconds = time.perf_counter() - state["started"]
                state["result"] = {"rows": state["done"], "seconds": seconds,
                                   "rows_per_second": state["done"] / seconds}
                # Faust captures stdout: the result goes to a file; the benchmark stops this process.
                with open(f"{path}.result.json", "w") as fh:
                    fh.write(json.dumps(state["result"]))

    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "raw":
        result = raw(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5],
                     sys.argv[6] if len(sys.argv) > 6 else "orjson")
        with open(f"{sys.argv[5]}.result.json", "w") as fh:
            fh.write(json.dumps(result))
    elif kind == "faust":
        faust_agent(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), sys.argv[7])
