"""Property-based fuzzing of parsing and validation (hypothesis).

Two properties, over anything a producer could send:
- parse_batch never raises;
- every input row is either a parsed row whose values equal the input, or a
  dead letter with a known reason (nothing vanishes, nothing is made up).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import orjson
import pyarrow as pa
from enricher.models.spec import ModelSpec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enricher import sample
from enricher.stream.contract import MAX_ID_CHARS, REASONS, parse_batch, to_ipc

SPEC = ModelSpec.from_json(sample.MODEL_ID, sample.SCHEMA)
SPECS = {sample.MODEL_ID: SPEC}.get
MAX = 1 << 20
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any character, lone surrogates included (they reach us as \ud800 escapes).
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)
numbers = st.one_of(st.integers(min_value=-(10 ** 400), max_value=10 ** 400), st.floats(allow_nan=True),
                    st.floats(allow_infinity=True), st.integers(min_value=-(2 ** 70), max_value=2 ** 70))
scalars = st.one_of(st.none(), st.booleans(), numbers, any_text)
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(any_text, inner, max_size=4)),
                        max_leaves=12)


def mostly(valid, hostile, one_in: int = 12):
    """`valid` usually, `hostile` one time in `one_in`: so that most rows are
    good and the round trip of stored values is checked too."""
    return st.integers(0, one_in - 1).flatmap(lambda k: hostile if k == 0 else valid)


timestamps = mostly(st.one_of(st.integers(min_value=1_000_000_000_000, max_value=2_000_000_000_000),
                              st.datetimes(min_value=datetime(1980, 1, 1), max_value=datetime(2200, 1, 1),
                                           timezones=st.just(timezone.utc)).map(lambda d: d.isoformat())),
                    st.one_of(anything, st.datetimes().map(lambda d: d.isoformat())))
feature_values = mostly(st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-10 ** 6, 10 ** 6)),
                        anything, one_in=40)
category_values = mostly(st.one_of(st.sampled_from(sample.REGIONS), st.text(max_size=10)),
                         st.one_of(any_text, anything))


@st.composite
def inferences(draw):
    """Mostly well-formed inferences with any field possibly hostile or missing."""
    features = {n: draw(feature_values) for n in sample.NUMERIC if draw(st.integers(0, 60))}
    if draw(st.integers(0, 8)):
        features["region"] = draw(category_values)
    msg = {"model_id": draw(mostly(st.just(sample.MODEL_ID), anything)),
           "inference_id": draw(mostly(st.text(max_size=20), st.one_of(any_text, st.integers(), anything))),
           "timestamp": draw(timestamps),
           "features": draw(mostly(st.just(features), anything)),
           "prediction": draw(mostly(st.floats(0, 1), anything))}
    if draw(st.booleans()):
        msg["attributes"] = {"sex": draw(category_values)}
    for key in list(msg):
        if draw(st.integers(0, 30)) == 0:
            del msg[key]
    return msg


def encode(obj) -> bytes:
    # Python's json writes what orjson refuses (NaN, huge integers, lone surrogates).
    try:
        return json.dumps(obj, allow_nan=True).encode()
    except ValueError:  # an integer too long for str(): what such a producer would fail on too
        return b"{}"


def _float(v):
    return float(v)


def check_round_trip(obj, batch, row: int) -> None:
    """The parsed row holds the input's values."""
    rows = batch.models[sample.MODEL_ID]
    iid = obj["inference_id"]
    assert rows.inference_id[row].as_py() == str(iid)
    for name in sample.NUMERIC:
        assert rows.values[name][row].as_py() == _float(obj["features"][name])
    region = obj["features"].get("region")
    assert rows.values["region"][row].as_py() == (None if region is None else str(region))
    assert rows.prediction[row].as_py() == _float(obj["prediction"])
    ts = obj["timestamp"]
    got = rows.timestamp[row].as_py()
    if isinstance(ts, str):
        want = datetime.fromisoformat(ts)
        want = want if want.tzinfo else want.replace(tzinfo=timezone.utc)
        assert abs((got - want).total_seconds()) < 0.001
    else:
        assert got == datetime.fromtimestamp(int(ts) // 1000, timezone.utc).replace(
            microsecond=(int(ts) % 1000) * 1000)


def account(objs: list, batch) -> None:
    """Every row is stored (equal to its input) or dead-lettered with a known reason, once."""
    rows = batch.models.get(sample.MODEL_ID)
    stored = rows.num_rows if rows is not None else 0
    assert stored + len(batch.dead) == len(objs)
    assert all(d.reason in REASONS and d.detail for d in batch.dead)
    # Each stored row says which input it came from (the JSON items' numbering).
    if rows is not None:
        origins = rows.origin.tolist()
        assert len(set(origins)) == stored
        dead = {d.offset if d.index is None else d.index for d in batch.dead}
        assert not dead & set(origins), "a row both stored and dead-lettered"
        for row, k in enumerate(origins):
            check_round_trip(objs[k], batch, row)


@FUZZ
@given(st.lists(inferences(), min_size=1, max_size=6))
def test_single_messages_never_raise_and_every_row_is_accounted_for(objs):
    values = [encode(o) for o in objs]
    batch = parse_batch(values, [0] * len(values), list(range(len(values))), SPECS, MAX)
    decoded = []
    for v in values:
        try:
            decoded.append(json.loads(v))
        except ValueError:
            decoded.append(None)
    account(decoded, batch)


@FUZZ
@given(st.lists(inferences(), min_size=0, max_size=8))
def test_a_batched_json_message_never_raises_and_every_row_is_accounted_for(objs):
    raw = encode(objs)
    batch = parse_batch([raw], [0], [0], SPECS, MAX)
    if raw == b"{}":
        return
    account(json.loads(raw), batch)


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(raw):
    batch = parse_batch([raw], [0], [0], SPECS, MAX)
    rows = sum(r.num_rows for r in batch.models.values())
    assert rows or batch.dead or raw.strip() in (b"[]",)


def _valid_ipc(n: int) -> bytes:
    rows = [orjson.loads(m) for m in sample.inferences(n)[0]]
    return to_ipc(pa.Table.from_pylist(rows))


@FUZZ
@given(st.integers(1, 5), st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1,
                                   max_size=6))
def test_arrow_streams_with_corrupted_bytes_never_raise(n, flips):
    data = bytearray(_valid_ipc(n))
    for at, byte in flips:
        data[at % len(data)] = byte
    batch = parse_batch([bytes(data)], [0], [0], SPECS, MAX)
    rows = sum(r.num_rows for r in batch.models.values())
    assert rows + sum(1 for d in batch.dead if d.index is not None) <= max(n, 1) or \
        any(d.reason == "invalid_arrow" for d in batch.dead)


@FUZZ
@given(st.lists(inferences(), min_size=1, max_size=5))
def test_arrow_streams_of_hostile_rows_never_raise(objs):
    clean = []
    for k, obj in enumerate(objs):
        obj = json.loads(encode(obj)) if encode(obj) != b"{}" else {}
        obj["inference_id"] = f"a{k}"
        clean.append(obj)
    try:
        table = pa.Table.from_pylist(clean)
    except Exception:  # noqa: BLE001 - pyarrow cannot even build it: nothing a producer could send
        return
    batch = parse_batch([to_ipc(table)], [0], [0], SPECS, MAX)
    stored = sum(r.num_rows for r in batch.models.values())
    assert stored + len(batch.dead) == len(clean) or [d.reason for d in batch.dead] == ["invalid_arrow"]


def test_ids_at_the_length_limit_are_stored_and_beyond_it_refused():
    base = orjson.loads(sample.inferences(1)[0][0])
    values = [orjson.dumps({**base, "inference_id": "x" * MAX_ID_CHARS}),
              orjson.dumps({**base, "inference_id": "y" * (MAX_ID_CHARS + 1)})]
    batch = parse_batch(values, [0, 0], [0, 1], SPECS, MAX)
    assert batch.models[sample.MODEL_ID].inference_id.to_pylist() == ["x" * MAX_ID_CHARS]
    assert [(d.reason, d.offset) for d in batch.dead] == [("out_of_range", 1)]
