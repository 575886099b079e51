"""Many inferences in one Kafka message: a JSON array or an Arrow IPC stream."""

import orjson
import pyarrow as pa
import pytest
from enricher.models.spec import ModelSpec

from enricher import sample
from enricher.stream.contract import ARROW_STREAM, JSON, parse_batch, to_ipc

SPEC = ModelSpec.from_json(sample.MODEL_ID, sample.SCHEMA)
OTHER = ModelSpec.from_json("other_model", sample.SCHEMA)
SPECS = {SPEC.model_id: SPEC, OTHER.model_id: OTHER}.get


def parse(messages, content_types=None):
    return parse_batch(messages, [3] * len(messages), [100 + i for i in range(len(messages))], SPECS,
                       1 << 20, content_types)


def objects(n, **kw):
    return [orjson.loads(m) for m in sample.inferences(n, **kw)[0]]


def arrow_of(objs):
    return to_ipc(pa.Table.from_pylist(objs))


def test_a_json_array_is_many_inferences_and_one_bad_row_leaves_alone():
    objs = objects(6)
    objs[3]["features"]["f2"] = "high"
    batch = parse([orjson.dumps(objs)])
    rows = batch.models[SPEC.model_id]
    assert rows.inference_id.to_pylist() == [o["inference_id"] for i, o in enumerate(objs) if i != 3]
    assert rows.offset.tolist() == [100] * 5 and rows.partition.tolist() == [3] * 5
    [dead] = batch.dead
    assert (dead.reason, dead.index, dead.offset) == ("wrong_feature_type", 3, 100)
    assert orjson.loads(dead.raw) == objs[3], "the bad row alone, so it can be replayed without its batch"


def test_an_arrow_ipc_stream_with_the_same_columns_is_read_by_casts():
    objs = objects(50)
    rows = parse([arrow_of(objs)]).models[SPEC.model_id]
    assert rows.num_rows == 50
    assert rows.values["f0"].to_pylist() == [o["features"]["f0"] for o in objs]
    assert rows.values["region"].to_pylist() == [o["features"]["region"] for o in objs]
    assert rows.values["sex"].to_pylist() == [o["attributes"]["sex"] for o in objs]
    assert rows.timestamp.cast(pa.int64()).to_pylist() == [o["timestamp"] for o in objs]


def test_arrow_rows_are_validated_one_by_one():
    objs = objects(5)
    objs[1]["features"]["f4"] = None
    objs[2]["features"]["f5"] = float("nan")
    objs[4]["timestamp"] = 1764000000  # seconds, not milliseconds
    batch = parse([arrow_of(objs)])
    assert batch.models[SPEC.model_id].inference_id.to_pylist() == [objs[0]["inference_id"], objs[3]["inference_id"]]
    reasons = {d.index: d.reason for d in batch.dead}
    assert reasons == {1: "missing_feature", 2: "non_finite", 4: "invalid_timestamp"}
    alone = pa.ipc.open_stream(next(d.raw for d in batch.dead if d.index == 1)).read_all()
    assert alone.num_rows == 1 and alone.column("inference_id")[0].as_py() == objs[1]["inference_id"]


def test_arrow_timestamps_as_timestamps_or_iso_strings():
    objs = objects(3)
    table = pa.Table.from_pylist(objs)
    as_ts = table.set_column(table.column_names.index("timestamp"), "timestamp",
                             table.column("timestamp").cast(pa.timestamp("ms")))
    as_str = table.set_column(table.column_names.index("timestamp"), "timestamp",
                              pa.array(["2026-11-24T06:00:00Z"] * 3))
    a = parse([to_ipc(as_ts)]).models[SPEC.model_id].timestamp.cast(pa.int64()).to_pylist()
    b = parse([to_ipc(as_str)]).models[SPEC.model_id].timestamp.cast(pa.int64()).to_pylist()
    assert a == [o["timestamp"] for o in objs] and b == [1795500000000] * 3


def test_an_arrow_column_of_the_wrong_type_refuses_its_rows():
    objs = objects(4)
    for o in objs:
        o["features"]["f1"] = str(o["features"]["f1"])
    batch = parse([arrow_of(objs)])
    assert SPEC.model_id not in batch.models
    assert [d.reason for d in batch.dead] == ["wrong_feature_type"] * 4
    assert "column of type string" in batch.dead[0].detail


def test_one_arrow_message_may_hold_several_models_and_unknown_ones():
    objs = objects(4) + objects(3, model_id="other_model", id_prefix="o") + objects(2, model_id="ghost", id_prefix="g")
    batch = parse([arrow_of(objs)])
    assert batch.models[SPEC.model_id].num_rows == 4 and batch.models["other_model"].num_rows == 3
    assert [(d.reason, d.index) for d in batch.dead] == [("unknown_model", 7), ("unknown_model", 8)]


def test_singles_arrays_and_arrow_messages_mix_in_one_batch():
    a, b, c = objects(3, id_prefix="a"), objects(4, id_prefix="b"), objects(5, id_prefix="c")
    batch = parse([orjson.dumps(a[0]), orjson.dumps(b), arrow_of(c), orjson.dumps(a[1])])
    rows = batch.models[SPEC.model_id]
    assert sorted(rows.inference_id.to_pylist()) == sorted(o["inference_id"] for o in a[:2] + b + c)
    assert sorted(rows.offset.tolist()) == [100, 101, 101, 101, 101, 102, 102, 102, 102, 102, 103]


def test_the_content_type_header_decides_over_the_content():
    objs = objects(2)
    wrong = parse([orjson.dumps(objs)], content_types=[ARROW_STREAM])
    assert [d.reason for d in wrong.dead] == ["invalid_arrow"]
    right = parse([orjson.dumps(objs)], content_types=[JSON])
    assert right.models[SPEC.model_id].num_rows == 2


@pytest.mark.parametrize("raw", [b"\xff\xff\xff\xff garbage", b"\xff\xff\xff\xff"])
def test_unreadable_arrow_is_dead_lettered(raw):
    assert [d.reason for d in parse([raw]).dead] == ["invalid_arrow"]


def test_array_elements_that_are_not_objects_are_named():
    batch = parse([orjson.dumps([objects(1)[0], 5, "x"])])
    assert [(d.reason, d.index) for d in batch.dead] == [("not_an_object", 1), ("not_an_object", 2)]
    assert batch.models[SPEC.model_id].num_rows == 1
