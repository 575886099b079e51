"""A corpus of hostile messages: what a producer may send, and what must become of it.

Each kind is one Kafka message (bytes, and a content-type header or none)
with what the worker must make of it: the inference ids that must be stored
(exactly those, once each) and the dead-letter reasons it must produce (one
per bad row). The tests send the whole corpus mid-stream (test_hostile.py)
and parse each kind on its own.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import orjson
import pyarrow as pa

from enricher import sample
from enricher.stream.contract import ARROW_STREAM, JSON, to_ipc

TS = 1_764_000_000_000


@dataclass
class Hostile:
    kind: str
    value: bytes
    content_type: str | None = None
    stored: set[str] = field(default_factory=set)   # inference ids that must reach the table
    reasons: Counter = field(default_factory=Counter)  # dead letters it must give, by reason


def good(iid: str, **changes) -> dict:
    msg = {"model_id": sample.MODEL_ID, "inference_id": iid, "timestamp": TS,
           "features": {**{n: 1.0 + i for i, n in enumerate(sample.NUMERIC)}, "region": "north"},
           "prediction": 0.5, "attributes": {"sex": "f"}}
    msg.update(changes)
    return msg


def with_feature(iid: str, name: str, value) -> dict:
    msg = good(iid)
    msg["features"] = {**msg["features"], name: value}
    return msg


def raw_with(iid: str, field_name: str, literal: bytes, in_features: bool = False) -> bytes:
    """A message whose field is written as the literal bytes given (what a JSON
    library would not write: NaN, 400-digit numbers, lone surrogates...)."""
    msg = good(iid)
    marker = "__HOSTILE__"
    if in_features:
        msg["features"] = {**msg["features"], field_name: marker}
    else:
        msg[field_name] = marker
    return orjson.dumps(msg).replace(f'"{marker}"'.encode(), literal)


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * depth + close * depth


def _arrow(rows: list[dict]) -> bytes:
    return to_ipc(pa.Table.from_pylist(rows))


def _arrow_lying_about_lengths() -> bytes:
    """A valid stream whose string offsets are then made to point far past
    their data buffer: reading it unchecked reads out of bounds."""
    table = pa.table({"model_id": [sample.MODEL_ID] * 2, "inference_id": ["lieA", "lieB"]})
    data = bytearray(to_ipc(table))
    offsets = (0).to_bytes(4, "little") + (4).to_bytes(4, "little") + (8).to_bytes(4, "little")
    at = data.index(offsets, data.index(b"lieA") - 64)
    data[at + 4:at + 12] = (1 << 20).to_bytes(4, "little") + (1 << 30).to_bytes(4, "little")
    return bytes(data)


def _arrow_claiming_more_rows() -> bytes:
    """The record batch header claims more rows than its buffers hold."""
    table = pa.table({"model_id": [sample.MODEL_ID] * 3, "inference_id": ["rowA", "rowB", "rowC"]})
    data = bytearray(to_ipc(table))
    # the record batch message's length field (int64 3) is the first 3 after the schema message
    at = data.index((3).to_bytes(8, "little"), 8 + int.from_bytes(data[4:8], "little"))
    data[at:at + 8] = (1 << 40).to_bytes(8, "little")
    return bytes(data)


def corpus(max_bytes: int) -> list[Hostile]:
    """At least 60 kinds; inference ids start with `h-` and are unique across kinds."""
    out: list[Hostile] = []

    def add(kind, value, reasons=(), stored=(), content_type=None):
        out.append(Hostile(kind, value, content_type, set(stored), Counter(reasons)))

    def bad(kind, msg, reason):
        add(kind, msg if isinstance(msg, bytes) else orjson.dumps(msg), [reason])

    def ok(kind, iid, msg):
        add(kind, msg if isinstance(msg, bytes) else orjson.dumps(msg), stored=[iid])

    # -- encodings
    bad("not UTF-8", b"\xff\xfe\xfd{\"model_id\": 1}", "invalid_json")
    bad("UTF-16 JSON", json.dumps(good("h-utf16")).encode("utf-16"), "invalid_json")
    bad("Latin-1 byte inside a string", orjson.dumps(good("h-latin")).replace(b"north", b"nor\xe9th"),
        "invalid_json")
    bad("UTF-8 byte order mark", b"\xef\xbb\xbf" + orjson.dumps(good("h-bom")), "invalid_json")
    bad("empty message", b"", "invalid_json")
    bad("whitespace only", b"  \n\t ", "invalid_json")
    bad("NUL bytes only", b"\x00" * 64, "invalid_json")
    bad("truncated JSON", orjson.dumps(good("h-trunc"))[:-7], "invalid_json")
    bad("lone surrogate in inference_id", raw_with("h-surr1", "inference_id", b'"a\\ud800b"'), "invalid_text")
    bad("lone surrogate in a categorical feature", raw_with("h-surr2", "region", b'"\\udfff"', True),
        "invalid_text")
    bad("lone surrogate in model_id", raw_with("h-surr3", "model_id", b'"credit\\ud800"'), "unknown_model")
    ok("NUL inside inference_id", "h-nul\x00id", good("h-nul\x00id"))
    ok("NUL inside a categorical", "h-nulcat", with_feature("h-nulcat", "region", "no\x00rth"))
    ok("emoji and right-to-left text", "h-\U0001f600\u202e", good("h-\U0001f600\u202e"))
    # -- nesting
    bad("array nested 5,000 deep", nested(5000), "invalid_json")
    bad("object nested 5,000 deep", b'{"a":' * 5000 + b"1" + b"}" * 5000, "invalid_json")
    bad("feature nested 500 deep", raw_with("h-deep1", "f0", nested(500), True), "wrong_feature_type")
    bad("feature nested 2,000 deep", raw_with("h-deep2", "f0", nested(2000), True), "invalid_json")
    bad("features nested 500 deep", raw_with("h-deep3", "features", nested(500)), "wrong_type")
    bad("inference_id nested 900 deep", raw_with("h-deep4", "inference_id", nested(900)), "wrong_type")
    # -- numbers
    bad("400-digit integer feature", raw_with("h-big1", "f0", b"9" * 400, True), "out_of_range")
    bad("400-digit negative integer feature", raw_with("h-big2", "f3", b"-" + b"7" * 400, True), "out_of_range")
    bad("400-digit integer prediction", raw_with("h-big3", "prediction", b"1" * 400), "out_of_range")
    bad("400-digit integer timestamp", raw_with("h-big4", "timestamp", b"1" * 400), "out_of_range")
    bad("5,000-digit integer (beyond Python's int parsing limit)", raw_with("h-big5", "f0", b"3" * 5000, True),
        "invalid_json")
    bad("1e400 feature", raw_with("h-inf1", "f1", b"1e400", True), "non_finite")
    bad("-1e400 feature", raw_with("h-inf2", "f2", b"-1e400", True), "non_finite")
    bad("NaN literal feature", raw_with("h-nan1", "f4", b"NaN", True), "non_finite")
    bad("Infinity literal prediction", raw_with("h-inf3", "prediction", b"Infinity"), "non_finite")
    bad("-Infinity label", raw_with("h-inf4", "label", b"-Infinity"), "non_finite")
    ok("1e-400 feature (underflows to 0)", "h-tiny", raw_with("h-tiny", "f5", b"1e-400", True))
    ok("-0.0 feature", "h-negzero", with_feature("h-negzero", "f6", -0.0))
    ok("2**64 feature", "h-2p64", raw_with("h-2p64", "f7", str(2 ** 64).encode(), True))
    ok("largest float", "h-maxfloat", with_feature("h-maxfloat", "f8", 1.7976931348623157e308))
    ok("boolean as a numeric feature", "h-bool", with_feature("h-bool", "f9", True))
    bad("number as a string", with_feature("h-str", "f0", "1.5"), "wrong_feature_type")
    bad("number as an object", with_feature("h-obj", "f0", {"value": 1}), "wrong_feature_type")
    bad("categorical as a list", with_feature("h-catlist", "region", ["north"]), "wrong_feature_type")
    # -- timestamps, in every form
    bad("timestamp in seconds", good("h-ts1", timestamp=1_764_000_000), "invalid_timestamp")
    bad("negative timestamp", good("h-ts2", timestamp=-5), "invalid_timestamp")
    bad("timestamp in year 9999 (ISO)", good("h-ts3", timestamp="9999-12-31T23:59:59Z"), "out_of_range")
    bad("timestamp in year 1 (ISO)", good("h-ts4", timestamp="0001-01-01T00:00:00Z"), "out_of_range")
    bad("timestamp after 2299 (ms)", good("h-ts5", timestamp=100_000_000_000_000), "out_of_range")
    bad("timestamp beyond int64 (ms)", good("h-ts6", timestamp=2 ** 63 + 5), "out_of_range")
    bad("timestamp NaN", raw_with("h-ts7", "timestamp", b"NaN"), "invalid_timestamp")
    bad("timestamp 1e400", raw_with("h-ts8", "timestamp", b"1e400"), "invalid_timestamp")
    bad("timestamp as an object", good("h-ts9", timestamp={"ms": TS}), "wrong_type")
    bad("timestamp as a boolean", good("h-ts10", timestamp=True), "wrong_type")
    bad("timestamp with an offset of 25 hours", good("h-ts11", timestamp="2026-11-24T06:00:00+25:00"),
        "invalid_timestamp")
    bad("timestamp as an empty string", good("h-ts12", timestamp=""), "invalid_timestamp")
    bad("timestamp as words", good("h-ts13", timestamp="next tuesday"), "invalid_timestamp")
    bad("timestamp missing", {k: v for k, v in good("h-ts14").items() if k != "timestamp"}, "missing_field")
    ok("timestamp as a float of ms", "h-ts15", good("h-ts15", timestamp=1.7640000001234e12))
    ok("timestamp ISO without offset", "h-ts16", good("h-ts16", timestamp="2026-11-24T06:00:00.123"))
    ok("timestamp ISO with +05:30", "h-ts17", good("h-ts17", timestamp="2026-11-24T06:00:00+05:30"))
    # -- strings and ids
    bad("inference_id of 2,000 characters", good("h-" + "x" * 2000), "out_of_range")
    ok("inference_id as a number", "987654321", good(987654321))
    bad("inference_id as an object", good({"id": 1}), "wrong_type")
    bad("inference_id null", good(None), "missing_field")
    ok("huge categorical", "h-hugecat", with_feature("h-hugecat", "region", "r" * (max_bytes // 2)))
    ok("SQL in inference_id", "h-'); DROP TABLE x; --", good("h-'); DROP TABLE x; --"))
    ok("backticks and quotes in a categorical", "h-tick", with_feature("h-tick", "region", "`a`'b'\"c\"\\"))
    ok("SQL and backticks in extra keys", "h-keys",
       {**good("h-keys"), "`; DROP DATABASE enricher; --": 1,
        "features": {**good("h-keys")["features"], "f0`) FORMAT": "x", "'": None}})
    bad("SQL in model_id", good("h-sqlmodel", model_id="credit_default'; DROP TABLE t; --"), "unknown_model")
    bad("model_id as a list", good("h-mlist", model_id=[sample.MODEL_ID]), "wrong_type")
    bad("model_id as an empty string", good("h-mempty", model_id=""), "unknown_model")
    bad("huge model_id", good("h-mhuge", model_id="m" * (max_bytes // 2)), "unknown_model")
    ok("duplicate model_id key (the last wins)", "h-dupkey",
       orjson.dumps(good("h-dupkey"))[:-1] + b',"model_id":"' + sample.MODEL_ID.encode() + b'"}')
    # -- wrong types, in every field
    bad("features as a list", good("h-w1", features=[1, 2, 3]), "wrong_type")
    bad("features as a string", good("h-w2", features="f0=1"), "wrong_type")
    bad("features null", good("h-w3", features=None), "missing_field")
    bad("prediction as a string", good("h-w4", prediction="yes"), "wrong_type")
    bad("prediction missing", {k: v for k, v in good("h-w5").items() if k != "prediction"}, "missing_field")
    bad("attributes as a list", good("h-w6", attributes=["f"]), "wrong_type")
    bad("attribute as an object", good("h-w7", attributes={"sex": {"v": "f"}}), "wrong_feature_type")
    bad("label as an object", good("h-w8", label={"y": 1}), "wrong_type")
    bad("a JSON string", b'"hello"', "not_an_object")
    bad("JSON null", b"null", "not_an_object")
    bad("a bare number", b"12345", "not_an_object")
    # -- arrays
    add("array mixing good and bad rows",
        orjson.dumps([good("h-a1"), with_feature("h-a2", "f0", "x"), good("h-a3"), 7,
                      good("h-a4", timestamp="soon"), good("h-a5")]), content_type=JSON,
        stored={"h-a1", "h-a3", "h-a5"}, reasons=["wrong_feature_type", "not_an_object", "invalid_timestamp"])
    add("empty array", b"[]")
    add("array of non-objects", b'[1, "a", null, true]', reasons=["not_an_object"] * 4)
    add("array holding a row with a 400-digit number",
        b"[" + orjson.dumps(good("h-a6")) + b"," + raw_with("h-a7", "f0", b"9" * 400, True) + b"]",
        stored={"h-a6"}, reasons=["out_of_range"])
    add("array holding a row with a lone surrogate",
        b"[" + orjson.dumps(good("h-a8")) + b"," + raw_with("h-a9", "inference_id", b'"\\ud83d"') + b"]",
        stored={"h-a8"}, reasons=["invalid_text"])
    # -- Arrow IPC streams
    add("Arrow magic, then garbage", b"\xff\xff\xff\xff" + b"\x10\x00\x00\x00garbage" * 8, reasons=["invalid_arrow"])
    add("Arrow stream cut in half", _arrow([good("h-r1")])[:200], reasons=["invalid_arrow"])
    add("Arrow stream lying about its string lengths", _arrow_lying_about_lengths(), reasons=["invalid_arrow"])
    add("Arrow stream claiming more rows than it holds", _arrow_claiming_more_rows(), reasons=["invalid_arrow"])
    add("Arrow content-type on a JSON body", orjson.dumps(good("h-r2")), content_type=ARROW_STREAM, reasons=["invalid_arrow"])
    add("Arrow content-type, empty body", b"", content_type=ARROW_STREAM, reasons=["invalid_arrow"])
    add("Arrow with a string where a number goes",
        _arrow([with_feature("h-r3", "f0", "x"), with_feature("h-r4", "f0", "y")]),
        reasons=["wrong_feature_type"] * 2)
    add("Arrow with an integer model_id column", to_ipc(pa.table({"model_id": [1, 2]})),
        reasons=["wrong_type"] * 2)
    add("Arrow with features as a string column",
        to_ipc(pa.table({"model_id": [sample.MODEL_ID], "inference_id": ["h-r5"], "timestamp": [TS],
                         "features": ["f0=1"], "prediction": [0.5]})), reasons=["wrong_type"])
    add("Arrow timestamps in nanoseconds", to_ipc(pa.Table.from_pylist(
        [good("h-r6", timestamp=None)]).set_column(2, "timestamp", pa.array([TS * 1_000_000 + 7],
                                                                            pa.timestamp("ns")))),
        stored={"h-r6"})
    add("Arrow timestamps in seconds", _arrow([good("h-r7", timestamp=1_764_000_000)]),
        reasons=["invalid_timestamp"])
    add("Arrow timestamps after 2299", _arrow([good("h-r8", timestamp=10 ** 15)]), reasons=["out_of_range"])
    add("Arrow int64 feature near 2**63", _arrow([with_feature("h-r9", "f0", 2 ** 62 + 1)]), stored={"h-r9"})
    add("Arrow mixing good and bad rows",
        _arrow([good("h-r10"), with_feature("h-r11", "f3", None), good("h-r12", model_id="nobody")]),
        stored={"h-r10"}, reasons=["missing_feature", "unknown_model"])
    add("Arrow with no rows", to_ipc(pa.Table.from_pylist([good("h-r13")]).slice(0, 0)))
    # -- size
    add("larger than the message limit", orjson.dumps(good("h-big", padding="p" * max_bytes)),
        reasons=["too_large"])
    return out


def expected(kinds: list[Hostile]) -> tuple[set[str], Counter]:
    stored, reasons = set(), Counter()
    for h in kinds:
        stored |= h.stored
        reasons += h.reasons
    return stored, reasons
