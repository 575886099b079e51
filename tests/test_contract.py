"""Parsing and validation of raw messages into columnar batches."""

import math

import orjson
import pyarrow as pa
import pytest
from enricher.models.spec import ModelSpec

from enricher import sample
from enricher.stream.contract import REASONS, parse_batch

SPEC = ModelSpec.from_json(sample.MODEL_ID, sample.SCHEMA)
SPECS = {sample.MODEL_ID: SPEC}.get


def parse(messages, max_bytes=65_536):
    return parse_batch(messages, [0] * len(messages), list(range(len(messages))), SPECS, max_bytes)


def good(**changes):
    msg = {"model_id": sample.MODEL_ID, "inference_id": "a", "timestamp": 1764000000000,
           "features": {**{n: 1.5 for n in sample.NUMERIC}, "region": "north"}, "prediction": 0.25}
    msg.update(changes)
    return msg


def test_valid_messages_become_one_columnar_batch_per_model():
    msgs, _ = sample.inferences(300)
    batch = parse(msgs)
    assert batch.dead == []
    rows = batch.models[sample.MODEL_ID]
    assert rows.num_rows == 300
    assert rows.values["f0"].type == pa.float64() and rows.values["region"].type == pa.string()
    assert rows.inference_id.to_pylist()[:2] == ["inf-0000000", "inf-0000001"]
    assert rows.offset.tolist() == list(range(300))
    assert rows.label.null_count == 300  # label is optional
    assert set(rows.values["sex"].to_pylist()) == {"f", "m"}


def test_every_sample_malformed_message_gets_its_reason():
    cases = sample.malformed(max_bytes=4096)
    batch = parse([m for m, _ in cases], max_bytes=4096)
    assert batch.models == {}
    assert [d.reason for d in sorted(batch.dead, key=lambda d: d.offset)] == [r for _, r in cases]
    assert {d.reason for d in batch.dead} <= set(REASONS)
    assert all(d.raw == cases[d.offset][0] for d in batch.dead), "dead letters keep the original bytes"


def test_one_bad_row_leaves_the_rest_of_the_batch():
    msgs = [orjson.dumps(good(inference_id=str(i))) for i in range(10)]
    msgs[4] = orjson.dumps(good(inference_id="4", features={"f0": "x"}))
    batch = parse(msgs)
    assert [d.offset for d in batch.dead] == [4]
    rows = batch.models[sample.MODEL_ID]
    assert rows.inference_id.to_pylist() == [str(i) for i in range(10) if i != 4]
    assert rows.offset.tolist() == [i for i in range(10) if i != 4]


@pytest.mark.parametrize("changes, reason, detail", [
    ({"features": {"f0": 1}}, "missing_feature", "feature 'f1': missing"),
    ({"features": {**good()["features"], "f2": "7"}}, "wrong_feature_type", "feature 'f2': expected a number"),
    ({"features": {**good()["features"], "region": 1.5}}, "wrong_feature_type", "feature 'region'"),
    ({"features": [1, 2]}, "wrong_type", "features: expected an object"),
    ({"prediction": None}, "missing_field", "prediction: missing"),
    ({"prediction": "yes"}, "wrong_type", "prediction: expected a number"),
    ({"inference_id": None}, "missing_field", "inference_id"),
    ({"inference_id": {"a": 1}}, "wrong_type", "inference_id"),
    ({"timestamp": "not a time"}, "invalid_timestamp", "ISO-8601"),
    ({"timestamp": 1764000000}, "invalid_timestamp", "seconds"),
    ({"timestamp": [1]}, "wrong_type", "timestamp"),
    ({"attributes": {"sex": 3.5}}, "wrong_feature_type", "attribute 'sex'"),
    ({"attributes": "f"}, "wrong_type", "attributes"),
    ({"model_id": "ghost"}, "unknown_model", "ghost"),
])
def test_each_problem_is_named(changes, reason, detail):
    batch = parse([orjson.dumps(good(**changes))])
    assert [(d.reason) for d in batch.dead] == [reason]
    assert detail in batch.dead[0].detail


def test_nan_and_infinity_are_non_finite_not_invalid_json():
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        raw = orjson.dumps(good()).replace(b'"f4":1.5', b'"f4":' + literal)
        batch = parse([raw])
        assert [d.reason for d in batch.dead] == ["non_finite"], literal
        assert "feature 'f4'" in batch.dead[0].detail


def test_oversized_messages_are_refused_before_decoding():
    raw = orjson.dumps(good(pad="x" * 2000))
    batch = parse([raw], max_bytes=1000)
    assert [d.reason for d in batch.dead] == ["too_large"]
    assert "1000" in batch.dead[0].detail


@pytest.mark.parametrize("ts, expected_ms", [
    ("2026-11-24T06:00:00Z", 1795500000000),
    ("2026-11-24T07:00:00+01:00", 1795500000000),
    ("2026-11-24T06:00:00", 1795500000000),          # no offset: UTC
    ("2026-11-24T06:00:00.250Z", 1795500000250),
    (1795500000250, 1795500000250),
])
def test_timestamps_iso_or_epoch_milliseconds(ts, expected_ms):
    batch = parse([orjson.dumps(good(timestamp=ts))])
    assert batch.dead == []
    assert batch.models[sample.MODEL_ID].timestamp.cast(pa.int64()).to_pylist() == [expected_ms]


def test_mixed_timestamp_forms_in_one_batch():
    msgs = [orjson.dumps(good(timestamp=t)) for t in ("2026-11-24T06:00:00Z", 1795500000000, "2026-11-24 06:00:00")]
    batch = parse(msgs)
    assert batch.dead == []
    assert set(batch.models[sample.MODEL_ID].timestamp.cast(pa.int64()).to_pylist()) == {1795500000000}


def test_integer_ids_and_categories_are_kept_as_strings():
    msg = good(inference_id=42, features={**good()["features"], "region": 7}, label=1)
    rows = parse([orjson.dumps(msg)]).models[sample.MODEL_ID]
    assert rows.inference_id.to_pylist() == ["42"]
    assert rows.values["region"].to_pylist() == ["7"]
    assert rows.label.to_pylist() == [1.0]


def test_booleans_are_not_categories():
    batch = parse([orjson.dumps(good(features={**good()["features"], "region": True}))])
    assert [d.reason for d in batch.dead] == ["wrong_feature_type"]


def test_values_survive_exactly():
    msg = good(features={**good()["features"], "f0": -0.1 + 1e-12}, prediction=math.pi)
    rows = parse([orjson.dumps(msg)]).models[sample.MODEL_ID]
    assert rows.values["f0"].to_pylist() == [-0.1 + 1e-12]
    assert rows.prediction.to_pylist() == [math.pi]


def test_models_sharing_a_layout_are_validated_together_and_each_keeps_its_own_rows():
    # a and b share a layout, c has another (fewer features); rows interleave, bad rows scattered.
    narrow = {**sample.SCHEMA, "features": sample.SCHEMA["features"][:3], "attributes": []}
    specs = {"a": ModelSpec.from_json("a", sample.SCHEMA), "b": ModelSpec.from_json("b", sample.SCHEMA),
             "c": ModelSpec.from_json("c", narrow)}
    assert specs["a"].layout == specs["b"].layout != specs["c"].layout
    msgs, expected, bad_ids = [], {"a": [], "b": [], "c": []}, set()
    for i in range(60):
        model = "abc"[i % 3]
        features = {n: float(i) for n in sample.NUMERIC} | {"region": f"r{i}"}
        if model == "c":
            features = {c["name"]: float(i) for c in narrow["features"]}
        msg = {"model_id": model, "inference_id": f"{model}-{i}", "timestamp": 1764000000000 + i,
               "features": features, "prediction": i / 100}
        if i % 7 == 0 and model != "c":
            msg["features"].pop("f1")
            bad_ids.add(msg["inference_id"])
        else:
            expected[model].append(i)
        msgs.append(orjson.dumps(msg))
    batch = parse_batch(msgs, [0] * 60, list(range(60)), specs.get, 65_536)
    assert {(d.model_id, d.reason) for d in batch.dead} <= {("a", "missing_feature"), ("b", "missing_feature")}
    assert {orjson.loads(d.raw)["inference_id"] for d in batch.dead} == bad_ids
    for model, wanted in expected.items():
        rows = batch.models[model]
        assert rows.spec is specs[model]
        assert rows.inference_id.to_pylist() == [f"{model}-{i}" for i in wanted]
        assert rows.values["f0"].to_pylist() == [float(i) for i in wanted]  # values follow their own rows
        assert rows.offset.tolist() == wanted and rows.prediction.to_pylist() == [i / 100 for i in wanted]


def test_arrays_mixing_models_give_each_model_its_own_rows_in_order_and_each_bad_element_its_reason():
    # What a producer of many models batches: arrays whose elements belong to several
    # models (two of one layout, one of another), with label updates, unknown models,
    # non-objects and invalid rows among them. Each model gets exactly its valid rows,
    # in the order they were sent, with their own values, message and position.
    narrow = {**sample.SCHEMA, "features": sample.SCHEMA["features"][:3], "attributes": []}
    specs = {"a": ModelSpec.from_json("a", sample.SCHEMA), "b": ModelSpec.from_json("b", sample.SCHEMA),
             "c": ModelSpec.from_json("c", narrow)}
    expected, dead, labels = {"a": [], "b": [], "c": []}, [], []
    arrays = []
    for m in range(6):
        elements = []
        for pos in range(11):
            i = m * 11 + pos
            model = "bca"[(i * 5) % 3] if i % 4 else "a"
            features = {c["name"]: float(i) for c in (narrow if model == "c" else sample.SCHEMA)["features"]}
            if model != "c":
                features["region"] = f"r{i}"
            element = {"model_id": model, "inference_id": f"{model}-{i}", "timestamp": 1764000000000 + i,
                       "features": features, "prediction": i / 100}
            if i % 13 == 5:
                element = {"model_id": "ghost", "features": features}
                dead.append((m, pos, "unknown_model", "ghost"))
            elif i % 17 == 3:
                element = [i]
                dead.append((m, pos, "not_an_object", None))
            elif i % 10 == 9:
                element = {"model_id": model, "inference_id": f"{model}-{i - 1}", "label": 1.0}
                labels.append((model, f"{model}-{i - 1}"))
            elif i % 11 == 7 and model != "c":
                del element["features"]["f2"]
                dead.append((m, pos, "missing_feature", model))
            else:
                expected[model].append((i, m, pos))
            elements.append(element)
        arrays.append(orjson.dumps(elements))
    batch = parse_batch(arrays, [3] * len(arrays), list(range(100, 100 + len(arrays))), specs.get, 1 << 20)
    assert sorted((d.offset - 100, d.index, d.reason, d.model_id) for d in batch.dead) == sorted(dead)
    for model, wanted in expected.items():
        rows = batch.models[model]
        assert rows.spec is specs[model]
        assert rows.inference_id.to_pylist() == [f"{model}-{i}" for i, _, _ in wanted]
        assert rows.values["f0"].to_pylist() == [float(i) for i, _, _ in wanted]
        assert rows.prediction.to_pylist() == [i / 100 for i, _, _ in wanted]
        assert rows.offset.tolist() == [100 + m for _, m, _ in wanted]
        assert batch.dead_letter(int(rows.origin[0]), "x", "y", model).index == wanted[0][2]
    assert sorted((model, rid) for model, rows in batch.labels.items()
                  for rid in rows.inference_id.to_pylist()) == sorted(labels)


def test_a_timestamp_ahead_of_the_clock_by_more_than_the_skew_is_dead_lettered_in_json_and_arrow():
    import time

    from enricher.stream.contract import ARROW_STREAM, to_ipc

    now = int(time.time() * 1000)
    msgs = [orjson.dumps(good(inference_id="now", timestamp=now)),
            orjson.dumps(good(inference_id="soon", timestamp=now + 60_000)),       # within 300 s
            orjson.dumps(good(inference_id="tomorrow", timestamp=now + 86_400_000)),
            orjson.dumps(good(inference_id="decades", timestamp=now + 10**12))]  # 31 years on, under 2299
    arrow = to_ipc(pa.Table.from_pylist([{**good(inference_id="arrow-late"), "timestamp": now + 3_600_000},
                                         {**good(inference_id="arrow-ok"), "timestamp": now}]))
    values = msgs + [arrow]
    batch = parse_batch(values, [0] * 5, list(range(5)), SPECS, 65_536, [None] * 4 + [ARROW_STREAM],
                        max_future_skew=300)
    kept = batch.models[sample.MODEL_ID].inference_id.to_pylist()
    assert sorted(kept) == ["arrow-ok", "now", "soon"]
    dead = sorted((d.reason, d.detail.split(" is ")[0]) for d in batch.dead)
    assert [r for r, _ in dead] == ["future_timestamp"] * 3
    assert all("ENRICHER_MAX_FUTURE_SKEW allows (300 s)" in d.detail for d in batch.dead)
    assert "future_timestamp" in REASONS
    # without a skew (what-if, tests, ENRICHER_MAX_FUTURE_SKEW=0), any timestamp up to 2299 is taken
    assert len(parse(msgs).models[sample.MODEL_ID].inference_id) == 4


def test_a_batched_message_of_one_model_reads_as_the_same_rows_as_its_inferences_sent_alone():
    # The bulk path for an array of one registered model's inferences gives what one by one gives.
    rows = [good(inference_id=f"r{i}", features={**{n: i + 0.5 for n in sample.NUMERIC}, "region": "north"})
            for i in range(5)]
    alone = parse([orjson.dumps(r) for r in rows])
    batched = parse([orjson.dumps(rows)])
    assert batched.models[sample.MODEL_ID].values["f0"].equals(alone.models[sample.MODEL_ID].values["f0"])
    assert batched.models[sample.MODEL_ID].num_rows == 5 and not batched.dead
    # one bad element in the array: the rest goes in, and it leaves with its position
    mixed = parse([orjson.dumps(rows[:2] + [good(model_id="ghost")] + rows[2:] + [{"label": 1}])])
    assert mixed.models[sample.MODEL_ID].num_rows == 5
    assert sorted((d.reason, d.index) for d in mixed.dead) == [("missing_field", 6), ("unknown_model", 2)]

