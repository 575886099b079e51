"""The inference contract: raw Kafka messages -> validated columnar batches.

One message is one JSON object:

    {"model_id": "credit", "inference_id": "a1", "timestamp": "2026-11-24T06:00:00Z",
     "features": {"age": 41, "region": "north"}, "prediction": 0.83,
     "label": 1, "attributes": {"sex": "f"}}

`timestamp` is ISO-8601 (no offset means UTC) or epoch milliseconds; `label`
and `attributes` are optional. Every message is decoded once; after that the
work is per column: each field of a model's rows becomes one Arrow array in a
single conversion, and only when that conversion fails are the rows of that
column looked at one by one to say which are bad and why. A bad row leaves
the batch as a DeadLetter with a reason code and a readable detail; the rest
of the batch goes on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from models.spec import Column, ModelSpec

TS_TYPE = pa.timestamp("ms", tz="UTC")
# Epoch values below this (early 1973) are almost surely seconds, not milliseconds.
_MIN_EPOCH_MS = 100_000_000_000

REASONS = {
    "too_large": "message is larger than ENRICHER_MAX_MESSAGE_BYTES",
    "invalid_json": "message is not valid JSON",
    "not_an_object": "message is JSON but not an object",
    "missing_field": "a required field is missing or null",
    "wrong_type": "a field has the wrong type",
    "invalid_timestamp": "timestamp is not ISO-8601 or epoch milliseconds",
    "unknown_model": "model_id is not registered",
    "missing_feature": "a feature in the model's schema is missing or null",
    "wrong_feature_type": "a feature or attribute has the wrong type",
    "non_finite": "a number is NaN or infinite",
}


@dataclass
class DeadLetter:
    raw: bytes
    reason: str
    detail: str
    model_id: str | None
    partition: int
    offset: int


@dataclass
class ModelRows:
    """Valid rows of one model, column by column (all arrays of equal length)."""

    spec: ModelSpec
    inference_id: pa.Array
    timestamp: pa.Array
    prediction: pa.Array
    label: pa.Array
    values: dict[str, pa.Array]  # features and attributes by name
    partition: np.ndarray
    offset: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.inference_id)


@dataclass
class ParsedBatch:
    models: dict[str, ModelRows] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)
    consumed: int = 0


def parse_batch(values: list[bytes], partitions: list[int], offsets: list[int],
                specs: Callable[[str], ModelSpec | None], max_bytes: int) -> ParsedBatch:
    """Decode and validate one batch of raw messages.

    `specs(model_id)` returns the model's spec, or None if it is unknown.
    """
    out = ParsedBatch(consumed=len(values))
    by_model: dict[str, list[int]] = {}
    decoded: list = [None] * len(values)
    loads = orjson.loads
    for i, raw in enumerate(values):
        if raw is None:
            raw = values[i] = b""
        if len(raw) > max_bytes:
            out.dead.append(DeadLetter(raw, "too_large", f"message is {len(raw)} bytes, the limit is {max_bytes}",
                                       None, partitions[i], offsets[i]))
            continue
        try:
            obj = loads(raw)
        except orjson.JSONDecodeError as exc:
            obj = _lenient_loads(raw)
            if obj is None:
                out.dead.append(DeadLetter(raw, "invalid_json", str(exc), None, partitions[i], offsets[i]))
                continue
        if type(obj) is not dict:
            out.dead.append(DeadLetter(raw, "not_an_object", f"expected a JSON object, got {_kind(obj)}",
                                       None, partitions[i], offsets[i]))
            continue
        decoded[i] = obj
        model_id = obj.get("model_id")
        if type(model_id) is not str:
            reason = "missing_field" if model_id is None else "wrong_type"
            out.dead.append(DeadLetter(raw, reason, f"model_id: expected a string, got {_kind(model_id)}",
                                       None, partitions[i], offsets[i]))
            continue
        rows = by_model.get(model_id)
        if rows is None:
            if specs(model_id) is None:
                out.dead.append(DeadLetter(raw, "unknown_model", f"model {model_id!r} is not registered",
                                           model_id, partitions[i], offsets[i]))
                continue
            rows = by_model[model_id] = []
        rows.append(i)

    for model_id, rows in by_model.items():
        spec = specs(model_id)
        objs = [decoded[i] for i in rows]
        model_rows, bad = _columns(spec, objs)
        for j, (reason, detail) in sorted(bad.items()):
            i = rows[j]
            out.dead.append(DeadLetter(values[i], reason, detail, model_id, partitions[i], offsets[i]))
        if model_rows is not None:
            take = np.fromiter((rows[j] for j in range(len(rows)) if j not in bad), np.int64) if bad \
                else np.asarray(rows, np.int64)
            model_rows.partition = np.asarray(partitions, np.uint32)[take]
            model_rows.offset = np.asarray(offsets, np.uint64)[take]
            out.models[model_id] = model_rows
    return out


def _lenient_loads(raw: bytes):
    """JSON with NaN/Infinity literals (as Python's json writes them) decodes,
    so that such a message is dead-lettered as non_finite, naming the field."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _kind(value) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


Bad = dict[int, tuple[str, str]]


def _columns(spec: ModelSpec, objs: list[dict]) -> tuple[ModelRows | None, Bad]:
    bad: Bad = {}
    n = len(objs)
    inference_id = _typed([o.get("inference_id") for o in objs], _ID, "inference_id", bad,
                          missing="missing_field", wrong="wrong_type")
    timestamp = _timestamps([o.get("timestamp") for o in objs], bad)
    feats = [o.get("features") for o in objs]
    for j, f in enumerate(feats):
        if type(f) is not dict:
            _mark(bad, j, "missing_field" if f is None else "wrong_type",
                  f"features: expected an object, got {_kind(f)}")
            feats[j] = {}
    target = Column("prediction", spec.prediction_type)
    prediction = _typed([o.get("prediction") for o in objs], target, "prediction", bad,
                        missing="missing_field", wrong="wrong_type")
    label = _typed([o.get("label") for o in objs], target, "label", bad,
                   missing=None, wrong="wrong_type")
    values: dict[str, pa.Array] = {}
    for col in spec.features:
        values[col.name] = _typed([f.get(col.name) for f in feats], col, f"feature {col.name!r}", bad,
                                  missing="missing_feature", wrong="wrong_feature_type")
    if spec.attributes:
        attrs = [o.get("attributes") for o in objs]
        for j, a in enumerate(attrs):
            if a is not None and type(a) is not dict:
                _mark(bad, j, "wrong_type", f"attributes: expected an object, got {_kind(a)}")
            if type(a) is not dict:
                attrs[j] = {}
        for col in spec.attributes:
            values[col.name] = _typed([a.get(col.name) for a in attrs], col, f"attribute {col.name!r}", bad,
                                      missing=None, wrong="wrong_feature_type")
    if len(bad) == n:
        return None, bad
    keep = None
    if bad:
        mask = np.ones(n, bool)
        mask[list(bad)] = False
        keep = pa.array(mask)

    def kept(arr: pa.Array) -> pa.Array:
        return arr if keep is None else arr.filter(keep)

    rows = ModelRows(spec, kept(inference_id), kept(timestamp), kept(prediction), kept(label),
                     {k: kept(v) for k, v in values.items()}, np.empty(0), np.empty(0))
    return rows, bad


def _mark(bad: Bad, j: int, reason: str, detail: str) -> None:
    # The first problem found in a row is the one reported.
    bad.setdefault(j, (reason, detail))


_ID = Column("inference_id", "categorical")


def _typed(vals: list, col: Column, what: str, bad: Bad, missing: str | None, wrong: str) -> pa.Array:
    """One Arrow array for a field; rows that do not fit are marked in `bad`.

    `missing` is the reason for a null value, or None when the field is optional.
    """
    arrow_type = pa.float64() if col.numeric else pa.string()
    try:
        arr = pa.array(vals, arrow_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        arr = _typed_slowly(vals, col, what, bad, wrong)
    if missing is not None and arr.null_count:
        for j in np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)):
            _mark(bad, int(j), missing, f"{what}: missing")
    if col.numeric and arr.null_count < len(arr):
        finite = pc.fill_null(pc.is_finite(arr), True)
        if not pc.all(finite).as_py():
            for j in np.flatnonzero(~finite.to_numpy(zero_copy_only=False)):
                _mark(bad, int(j), "non_finite", f"{what}: {arr[int(j)].as_py()} is not a finite number")
    return arr


def _typed_slowly(vals: list, col: Column, what: str, bad: Bad, wrong: str) -> pa.Array:
    clean = []
    for j, v in enumerate(vals):
        t = type(v)
        if v is None:
            clean.append(None)
        elif col.numeric and t in (int, float, bool):
            try:
                clean.append(float(v))
            except OverflowError:  # an integer beyond float range
                clean.append(math.inf)
        elif not col.numeric and t in (str, int):
            clean.append(str(v))
        else:
            expected = "a number" if col.numeric else "a string"
            _mark(bad, j, wrong, f"{what}: expected {expected}, got {_kind(v)} {_short(v)}")
            clean.append(None)
    return pa.array(clean, pa.float64() if col.numeric else pa.string())


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _timestamps(vals: list, bad: Bad) -> pa.Array:
    # Fast paths: a batch of all epoch-ms numbers, or of ISO strings with offsets.
    try:
        arr = pa.array(vals, pa.int64())
        if arr.null_count == 0 and pc.min(arr).as_py() >= _MIN_EPOCH_MS:
            return arr.cast(TS_TYPE)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        pass
    try:
        arr = pa.array(vals, pa.string())
        if arr.null_count == 0:
            return arr.cast(TS_TYPE)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    out = []
    for j, v in enumerate(vals):
        ms = None
        t = type(v)
        if v is None:
            _mark(bad, j, "missing_field", "timestamp: missing")
        elif t is int or t is float:
            if not math.isfinite(v) or v < _MIN_EPOCH_MS:
                _mark(bad, j, "invalid_timestamp",
                      f"timestamp: {v!r} is not epoch milliseconds (seconds? multiply by 1000)")
            else:
                ms = int(v)
        elif t is str:
            try:
                dt = datetime.fromisoformat(v)
                if dt.tzinfo is None:
                    dt = dt.replace(tzinfo=timezone.utc)
                ms = int(dt.timestamp() * 1000)
            except ValueError:
                _mark(bad, j, "invalid_timestamp", f"timestamp: {_short(v)} is not ISO-8601")
        else:
            _mark(bad, j, "wrong_type", f"timestamp: expected a string or a number, got {_kind(v)}")
        out.append(ms)
    return pa.array(out, pa.int64()).cast(TS_TYPE)
