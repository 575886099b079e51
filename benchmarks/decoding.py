"""Decoding JSON-array messages: ours against the alternatives, on our data (issue 20, item 2).

    python benchmarks/decoding.py [--rows 100000] [--rounds 5]

The worker's batched-JSON path spends about a third of its time decoding and
validating (orjson into Python objects, then one list comprehension per field
for a layout's rows: enricher/stream/contract.py). This measures, on the sample
model's inferences in arrays of 500, what each candidate costs to go from the
message bytes to one Python list per feature (what validation starts from):
- orjson.loads, then dict lookups per field (ours, before validation);
- msgspec decoding into a Struct typed from the model's layout (type checks in
  C), then attribute reads per field;
- msgspec decoding untyped, then dict lookups;
- pysimdjson (simdjson) parsing, then converting to Python objects;
and our whole parse_batch (decode, validation, Arrow columns) for scale.
Median rows/s of the rounds. Writes benchmarks/results/decoding.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import operator
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
ARRAY = 500


def candidates(arrays: list[bytes]) -> dict:
    import msgspec
    import orjson
    import simdjson
    from enricher.models.spec import ModelSpec

    from enricher import sample
    from enricher.stream.contract import parse_batch

    names = sample.NUMERIC
    features = msgspec.defstruct("Features", [(n, float | None, None) for n in names]
                                 + [("region", str | None, None)])
    attributes = msgspec.defstruct("Attributes", [("sex", str | None, None)])
    inference = msgspec.defstruct("Inference", [("model_id", str), ("inference_id", str), ("timestamp", int),
                                                ("features", features), ("prediction", float | None, None),
                                                ("attributes", attributes | None, None)])
    typed = msgspec.json.Decoder(list[inference])
    untyped = msgspec.json.Decoder()
    parser = simdjson.Parser()
    getters = {n: operator.attrgetter(n) for n in names}
    spec = ModelSpec.from_json(sample.MODEL_ID, sample.SCHEMA)

    def columns_from_dicts(objs):
        feats = [o.get("features") for o in objs]
        return {n: [f.get(n) for f in feats] for n in names}

    def orjson_dicts():
        for a in arrays:
            columns_from_dicts(orjson.loads(a))

    def msgspec_typed():
        for a in arrays:
            feats = [o.features for o in typed.decode(a)]
            {n: list(map(g, feats)) for n, g in getters.items()}

    def msgspec_untyped():
        for a in arrays:
            columns_from_dicts(untyped.decode(a))

    def simdjson_objects():
        for a in arrays:
            columns_from_dicts(parser.parse(a).as_list())

    def ours_parse_batch():
        for i in range(0, len(arrays), 10):
            piece = arrays[i:i + 10]
            parse_batch(piece, [0] * len(piece), list(range(len(piece))),
                        lambda m: spec if m == sample.MODEL_ID else None, 1 << 24)

    return {"orjson + dict lookups (ours, before validation)": orjson_dicts,
            "msgspec, typed Struct + attribute reads": msgspec_typed,
            "msgspec, untyped + dict lookups": msgspec_untyped,
            "pysimdjson + Python objects + dict lookups": simdjson_objects,
            "our parse_batch (decode, validate, Arrow columns)": ours_parse_batch}


def run(rows: int, rounds: int) -> dict:
    from enricher import sample

    messages, _ = sample.inferences(rows)
    arrays = [b"[" + b",".join(messages[i:i + ARRAY]) + b"]" for i in range(0, len(messages), ARRAY)]
    out = {}
    for label, fn in candidates(arrays).items():
        fn()  # warm
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        out[label] = round(rows / statistics.median(times))
        print(f"{label}: {out[label]:,} rows/s", flush=True)
    return {"rows": rows, "array": ARRAY, "rounds": rounds, "rows_per_second": out,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write(r: dict) -> None:
    base = r["rows_per_second"]["orjson + dict lookups (ours, before validation)"]
    lines = [f"# Decoding JSON-array messages ({r['when']})", "",
             f"{r['rows']:,} sample inferences in arrays of {r['array']}, median of {r['rounds']} rounds, "
             "one core; bytes -> one Python list per feature (our parse_batch: to validated Arrow columns).", "",
             "| decoder | rows/s | vs ours |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {v:,} | {v / base:.2f}x |" for k, v in r["rows_per_second"].items()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decoding.json").write_text(json.dumps(r, indent=2) + "\n")
    (RESULTS / "decoding.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    write(run(args.rows, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
