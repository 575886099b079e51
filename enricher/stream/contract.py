"""The inference contract: raw Kafka messages -> validated columnar batches.

One message is one JSON object:

    {"model_id": "credit", "inference_id": "a1", "timestamp": "2026-11-24T06:00:00Z",
     "features": {"age": 41, "region": "north"}, "prediction": 0.83,
     "label": 1, "attributes": {"sex": "f"}}

`timestamp` is ISO-8601 (no offset means UTC) or epoch milliseconds; `label`
and `attributes` are optional.

A message with `model_id`, `inference_id` and `label` and no `features` is a
*label update* (ground truth that came later; labels.py brings it to its
row):

    {"model_id": "credit", "inference_id": "a1", "label": 1}

A message may also carry many inferences: a JSON array of such objects, or an
Arrow IPC stream with the same columns (`features` and `attributes` as struct
columns; label updates as a stream with `model_id`, `inference_id` and
`label` and no `features` column). The format is told by the content (an IPC stream starts with
0xFFFFFFFF, an array with `[`) or by a `content-type` header
(`application/json`, `application/vnd.apache.arrow.stream`). Each row of a
batched message is validated on its own.

Every message is decoded once; after that the
work is per column: each field of a model's rows becomes one Arrow array in a
single conversion, and only when that conversion fails are the rows of that
column looked at one by one to say which are bad and why. A bad row leaves
the batch as a DeadLetter with a reason code and a readable detail; the rest
of the batch goes on.
"""

from __future__ import annotations

import bisect
import contextvars
import itertools
import json
import logging
import math
import reprlib
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Callable

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from enricher.models.enrichment import InferenceBatch
from enricher.models.spec import Column, ModelSpec

log = logging.getLogger(__name__)

TS_TYPE = pa.timestamp("ms", tz="UTC")
# Epoch values below this (early 1973) are almost surely seconds, not milliseconds.
_MIN_EPOCH_MS = 100_000_000_000
# ClickHouse's DateTime64 ends with 2299: a later timestamp cannot be stored as given.
_MAX_EPOCH_MS = 10_413_792_000_000  # 2300-01-01T00:00:00Z
# An inference id is a key, not a payload: longer ones are refused (out_of_range).
MAX_ID_CHARS = 1024
# Rows one Arrow IPC message may hold (its buffers may be compressed, so its
# size in bytes says little about what it holds once read).
MAX_ARROW_ROWS = 1_000_000

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
    "out_of_range": "a value its column cannot hold (a number beyond float64, a timestamp outside "
                    "1973-2299, an inference id over 1,024 characters)",
    "future_timestamp": "the timestamp is later than now by more than ENRICHER_MAX_FUTURE_SKEW",
    "invalid_text": "a string that is not valid Unicode (a lone surrogate)",
    "invalid_arrow": "an Arrow IPC message that cannot be read",
    "store_rejected": "ClickHouse refused the row for a reason a retry will not change",
    "internal_error": "the row made the worker fail (a bug): logged with its offsets and set aside",
}

ARROW_STREAM = "application/vnd.apache.arrow.stream"
JSON = "application/json"
_ARROW_MAGIC = b"\xff\xff\xff\xff"


@dataclass
class DeadLetter:
    raw: bytes
    reason: str
    detail: str
    model_id: str | None
    partition: int
    offset: int
    index: int | None = None  # the row's position inside a batched message

    def __post_init__(self):
        if len(self.detail) > 300:  # details quote values, and values may be a megabyte long
            self.detail = self.detail[:297] + "..."


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
    origin: np.ndarray  # each row's id in its batch, to dead-letter it later (ParsedBatch.dead_letter)

    @property
    def num_rows(self) -> int:
        return len(self.inference_id)

    def batch(self) -> InferenceBatch:
        """The rows as an enrichment's transform sees them (no copy)."""
        return InferenceBatch(self.spec, self.values, self.num_rows, prediction=self.prediction, label=self.label,
                              inference_id=self.inference_id, timestamp=self.timestamp)


@dataclass
class LabelRows:
    """Valid label updates of one model."""

    spec: ModelSpec
    inference_id: pa.Array
    label: pa.Array  # float64 for a numeric prediction type, else string
    origin: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.inference_id)

    @classmethod
    def concat(cls, parts: list["LabelRows"]) -> "LabelRows":
        if len(parts) == 1:
            return parts[0]
        return cls(parts[0].spec, pa.concat_arrays([p.inference_id for p in parts]),
                   pa.concat_arrays([p.label for p in parts]), np.concatenate([p.origin for p in parts]))


@dataclass
class ParsedBatch:
    models: dict[str, ModelRows] = field(default_factory=dict)
    labels: dict[str, LabelRows] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)
    origins: "_Origins | None" = None

    def dead_letter(self, origin: int, reason: str, detail: str, model_id: str | None) -> DeadLetter:
        """A row that got through validation but is refused later (by the store, or a bug)."""
        raw, partition, offset, index = self.origins.describe(int(origin))
        return DeadLetter(raw, reason, detail, model_id, partition, offset, index)


def content_type(headers) -> str | None:
    """The content-type header of a message (Kafka headers: a list of (key, bytes) pairs)."""
    if not headers:
        return None
    items = headers.items() if isinstance(headers, dict) else headers
    for key, value in items:
        if key.lower() == "content-type" and value:
            return value.decode("ascii", "replace").split(";")[0].strip().lower()
    return None


def parse_batch(values: list[bytes], partitions: list[int], offsets: list[int],
                specs: Callable[[str], ModelSpec | None], max_bytes: int,
                content_types: list[str | None] | None = None, max_future_skew: float = 0.0) -> ParsedBatch:
    """Decode and validate one batch of raw messages.

    `specs(model_id)` returns the model's spec, or None if it is unknown.
    `content_types`, where given, holds each message's content-type header.
    `max_future_skew` (seconds, 0: no limit): a timestamp later than now by more
    is dead-lettered (`future_timestamp`): a producer's clock, or a unit, gone wrong.

    Nothing a producer sends makes this raise: every message ends up as rows
    or as dead letters. The checks below are written not to fail; should one
    fail all the same (a bug), the rows it was looking at are validated again
    one by one, and those that still fail leave as `internal_error`.
    """
    token = _FUTURE.set((int(time.time() * 1000), max_future_skew) if max_future_skew > 0 else None)
    try:
        return _parse_batch(values, partitions, offsets, specs, max_bytes, content_types)
    finally:
        _FUTURE.reset(token)


# For the batch being parsed (parse_batch sets it): (now in ms, the skew allowed in s), or None.
_FUTURE: contextvars.ContextVar[tuple[int, float] | None] = contextvars.ContextVar("future", default=None)


def _parse_batch(values, partitions, offsets, specs, max_bytes, content_types) -> ParsedBatch:
    out = ParsedBatch()
    items = _Items(out, specs, partitions, offsets)
    out.origins = _Origins(items, partitions, offsets)
    arrow_parts: list[tuple[int, pa.Table]] = []
    for i, raw in enumerate(values):
        if raw is None:
            raw = values[i] = b""
        try:
            _decode(raw, i, content_types[i] if content_types else None, max_bytes, items, arrow_parts)
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the batch; see above
            log.exception("decoding the message at %s/%s failed", partitions[i], offsets[i])
            out.dead.append(DeadLetter(raw, "internal_error", f"decoding failed: {_error(exc)}", None,
                                       partitions[i], offsets[i]))

    parts: dict[str, list[ModelRows]] = {}
    partition_of = np.asarray(partitions, np.uint32)
    offset_of = np.asarray(offsets, np.uint64)
    message_of = np.asarray(items.msg, np.int64)
    # Models with the same layout are validated together: one conversion per
    # field for all of them, not per model (a stream over thousands of models
    # has a few rows per model per batch, and the per-call cost would dominate).
    # The group's objects are read in arrival order, the order they lie in
    # memory (read in model order, each field's gather jumped all over the heap:
    # twice as slow at 1,000 models), and the validated columns are then put in
    # model order with one `take`, so each model's rows are contiguous and its
    # columns are slices of the group's.
    groups: dict[int, list[str]] = {}
    for model_id in items.by_model:
        groups.setdefault(specs(model_id).layout_id, []).append(model_id)
    for model_ids in groups.values():
        lists = [items.by_model[m] for m in model_ids]
        if len(lists) == 1:
            idx = np.asarray(lists[0], np.int64)
            owner = np.zeros(len(idx), np.int64)
        else:
            by_model = np.concatenate([np.asarray(rows, np.int64) for rows in lists])
            arrival = np.argsort(by_model, kind="stable")
            idx = by_model[arrival]
            owner = np.repeat(np.arange(len(model_ids)), [len(rows) for rows in lists])[arrival]
        order = idx.tolist()  # Python ints: list indexing below stays cheap
        group_rows, bad = _columns_guarded(specs(model_ids[0]), [items.objs[k] for k in order], idx)
        for j, (reason, detail) in sorted(bad.items()):
            items.dead(order[j], reason, detail, model_ids[owner[j]])
        if group_rows is None:
            continue
        if bad:
            keep = np.ones(len(idx), bool)
            keep[list(bad)] = False
            owner = owner[keep]
        if len(lists) > 1:
            group_rows = _taken(group_rows, np.argsort(owner, kind="stable"))
            owner = np.sort(owner, kind="stable")
        msg = message_of[group_rows.origin]
        group_rows.partition = partition_of[msg]
        group_rows.offset = offset_of[msg]
        counts = np.bincount(owner, minlength=len(model_ids))
        start = 0
        for model_id, count in zip(model_ids, counts.tolist()):
            if count:
                parts.setdefault(model_id, []).append(SlicedRows(group_rows, specs(model_id), start, count))
            start += count
    label_parts: dict[str, list[LabelRows]] = {}
    for model_id, order in items.labels_by_model.items():
        labels, bad = _guarded(_validate_labels, specs(model_id), [items.objs[k] for k in order],
                               np.asarray(order, np.int64))
        for j, (reason, detail) in sorted(bad.items()):
            items.dead(order[j], reason, detail, model_id)
        if labels is not None:
            label_parts.setdefault(model_id, []).append(labels)
    for i, table in arrow_parts:
        base = out.origins.add_arrow(i, table)
        try:
            found = _arrow_message(table, i, base, specs, out, partitions, offsets)
        except Exception as exc:  # noqa: BLE001 - as above: a bug sets the message aside, not the batch
            log.exception("validating the Arrow message at %s/%s failed", partitions[i], offsets[i])
            out.dead.append(DeadLetter(values[i], "internal_error", f"validation failed: {_error(exc)}", None,
                                       partitions[i], offsets[i]))
            continue
        for model_id, model_rows in found.items():
            (label_parts if isinstance(model_rows, LabelRows) else parts).setdefault(model_id, []).append(model_rows)
    for model_id, rows in parts.items():
        out.models[model_id] = rows[0] if len(rows) == 1 else _concat(rows)
    for model_id, labels in label_parts.items():
        out.labels[model_id] = LabelRows.concat(labels)
    return out


def _decode(raw: bytes, i: int, ctype: str | None, max_bytes: int, items: "_Items",
            arrow_parts: list[tuple[int, pa.Table]]) -> None:
    """One message: its inferences to `items` (JSON) or `arrow_parts`, or a dead letter."""
    dead = items.out.dead
    partition, offset = items.partitions[i], items.offsets[i]
    if len(raw) > max_bytes:
        dead.append(DeadLetter(raw, "too_large", f"message is {len(raw)} bytes, the limit is {max_bytes}",
                               None, partition, offset))
        return
    if ctype == ARROW_STREAM or (ctype is None and raw[:4] == _ARROW_MAGIC):
        table, problem = _read_arrow(raw)
        if table is None:
            dead.append(DeadLetter(raw, "invalid_arrow", problem, None, partition, offset))
        elif table.num_rows > MAX_ARROW_ROWS:
            dead.append(DeadLetter(raw, "too_large", f"Arrow message holds {table.num_rows:,} rows, "
                                   f"the limit is {MAX_ARROW_ROWS:,}", None, partition, offset))
        else:
            arrow_parts.append((i, table))
        return
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        obj = _lenient_loads(raw)
        if obj is _INVALID:
            dead.append(DeadLetter(raw, "invalid_json", str(exc)[:300], None, partition, offset))
            return
    if type(obj) is list:
        items.add_all(obj, raw, i)
    else:
        items.add(obj, raw, i, None)


def _read_arrow(raw: bytes) -> tuple[pa.Table | None, str]:
    """An IPC stream, read and fully validated before any column is touched: a
    stream can claim lengths and offsets its buffers do not have, and reading
    such a column unchecked reads out of bounds."""
    try:
        table = pa.ipc.open_stream(raw).read_all()
        table.validate(full=True)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, ArrowIOError, OSError, ...
        return None, _error(exc)
    return table, ""


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


class _Origins:
    """Where each validated row came from, so that a later stage (the store,
    the bisection of a failing batch) can still dead-letter it alone: JSON
    rows are numbered as `_Items` numbers them, Arrow rows after them."""

    ARROW_BASE = 1 << 40  # above any JSON item's number

    def __init__(self, items: "_Items", partitions, offsets):
        self.items, self.partitions, self.offsets = items, partitions, offsets
        self.bases: list[int] = []
        self.arrow: list[tuple[int, pa.Table]] = []

    def add_arrow(self, i: int, table: pa.Table) -> int:
        base = self.ARROW_BASE + (self.bases[-1] + self.arrow[-1][1].num_rows - self.ARROW_BASE
                                  if self.bases else 0)
        self.bases.append(base)
        self.arrow.append((i, table))
        return base

    def describe(self, origin: int) -> tuple[bytes, int, int, int | None]:
        if origin < self.ARROW_BASE:
            items = self.items
            i, pos = items.msg[origin], items.pos[origin]
            return items.raw_of(origin), self.partitions[i], self.offsets[i], pos
        k = bisect.bisect_right(self.bases, origin) - 1
        i, table = self.arrow[k]
        j = origin - self.bases[k]
        return to_ipc(table.slice(j, 1)), self.partitions[i], self.offsets[i], j


class _Items:
    """The inferences of a batch's JSON messages, one per object, with where each came from."""

    def __init__(self, out: ParsedBatch, specs, partitions, offsets):
        self.out, self.specs, self.partitions, self.offsets = out, specs, partitions, offsets
        self.objs: list = []
        self.msg: list[int] = []
        self.pos: list[int | None] = []
        self.raw: list[bytes] = []
        self.by_model: dict[str, list[int]] = {}
        self.labels_by_model: dict[str, list[int]] = {}

    def add(self, obj, raw: bytes, i: int, pos: int | None) -> None:
        k = len(self.objs)
        self.objs.append(obj)
        self.msg.append(i)
        self.pos.append(pos)
        self.raw.append(raw)
        self._place(k, obj)

    def _place(self, k: int, obj) -> None:
        """Item k (already listed) to its model's inferences or label updates, or dead."""
        if type(obj) is not dict:
            return self.dead(k, "not_an_object", f"expected a JSON object, got {_kind(obj)}", None)
        model_id = obj.get("model_id")
        if type(model_id) is not str:
            reason = "missing_field" if model_id is None else "wrong_type"
            return self.dead(k, reason, f"model_id: expected a string, got {_kind(model_id)}", None)
        update = obj.get("features") is None and "label" in obj  # a label update (module doc)
        by_model = self.labels_by_model if update else self.by_model
        rows = by_model.get(model_id)
        if rows is None:
            if self.specs(model_id) is None:
                return self.dead(k, "unknown_model", f"model {_short(model_id)} is not registered", model_id)
            rows = by_model[model_id] = []
        rows.append(k)

    def add_all(self, elements: list, raw: bytes, i: int) -> None:
        """A batched message's elements: as `add` each, but listed in bulk, and placed in
        bulk when they are what producers send, inferences (no label updates) of one
        registered model; inferences of models already seen take a short path too."""
        n = len(elements)
        if not n:
            return
        k0 = len(self.objs)
        self.objs.extend(elements)
        self.msg.extend(itertools.repeat(i, n))
        self.pos.extend(range(n))
        self.raw.extend(itertools.repeat(raw, n))
        by_model = self.by_model
        first = elements[0]
        model_id = first.get("model_id") if type(first) is dict else None
        if type(model_id) is str and all(type(e) is dict and e.get("model_id") == model_id
                                         and e.get("features") is not None for e in elements):
            rows = by_model.get(model_id)
            if rows is None and self.specs(model_id) is not None:
                rows = by_model[model_id] = []
            if rows is not None:
                rows.extend(range(k0, k0 + n))
                return
        for k, e in enumerate(elements, k0):  # a stream over many models: one dict read per row, mostly
            if type(e) is dict:
                model_id = e.get("model_id")
                if type(model_id) is str and e.get("features") is not None:
                    rows = by_model.get(model_id)
                    if rows is not None:
                        rows.append(k)
                        continue
            self._place(k, e)  # anything else, each with its reason

    def raw_of(self, k: int) -> bytes:
        # A row of a batched message leaves alone, as its own JSON, so it can be replayed.
        if self.pos[k] is None:
            return self.raw[k]
        try:
            return orjson.dumps(self.objs[k])
        except TypeError:  # integers beyond 64 bits, lone surrogates: what orjson will not write
            try:
                return json.dumps(self.objs[k]).encode()
            except Exception:  # noqa: BLE001 - then the whole message; batch_index says which row
                return self.raw[k]

    def dead(self, k: int, reason: str, detail: str, model_id: str | None) -> None:
        i = self.msg[k]
        self.out.dead.append(DeadLetter(self.raw_of(k), reason, detail, model_id, self.partitions[i],
                                        self.offsets[i], self.pos[k]))


class SlicedRows(ModelRows):
    """Rows start..start+count of a layout group's validated rows, as one model's.

    A batch spread over a thousand models has a few rows per model: slicing
    every column for every model costs more than validating them did, and the
    stream mostly joins the models' rows back together (storage rows, pooled
    scoring: `joined`). So each column is sliced only where something reads it
    (zero-copy, then kept), and `joined` takes consecutive slices of one group
    as a single slice of the group's column.
    """

    def __init__(self, source: ModelRows, spec: ModelSpec, start: int, count: int):  # no dataclass fields set
        self.spec, self.source, self.start, self.count = spec, source, start, count

    @property
    def num_rows(self) -> int:
        return self.count

    def _cut(self, array):
        return array.slice(self.start, self.count) if isinstance(array, (pa.Array, pa.ChunkedArray)) \
            else array[self.start:self.start + self.count]

    inference_id = cached_property(lambda self: self._cut(self.source.inference_id))
    timestamp = cached_property(lambda self: self._cut(self.source.timestamp))
    prediction = cached_property(lambda self: self._cut(self.source.prediction))
    label = cached_property(lambda self: self._cut(self.source.label))
    values = cached_property(lambda self: {k: self._cut(v) for k, v in self.source.values.items()})
    partition = cached_property(lambda self: self._cut(self.source.partition))
    offset = cached_property(lambda self: self._cut(self.source.offset))
    origin = cached_property(lambda self: self._cut(self.source.origin))


def joined(parts: list[ModelRows], get: Callable):
    """`get(rows)` (an Arrow array or a numpy array) of each part, one after the other: one slice
    of the group's column when the parts are consecutive slices of one group (SlicedRows)."""
    return Joined(parts)(get)


class Joined:
    """`joined` for several columns of the same parts: whether they are consecutive slices of
    one group is found once, not once per column (at 5,000 models, 5,000 parts x 30 columns)."""

    def __init__(self, parts: list[ModelRows]):
        self.parts = parts
        self.whole = _covering(parts) if len(parts) > 1 else None

    def __call__(self, get: Callable):
        if len(self.parts) == 1:
            return get(self.parts[0])
        if self.whole is not None:
            return self.whole._cut(get(self.whole.source))
        arrays = [get(p) for p in self.parts]
        return np.concatenate(arrays) if isinstance(arrays[0], np.ndarray) else pa.concat_arrays(arrays)


def _covering(parts: list[ModelRows]) -> "SlicedRows | None":
    """One slice covering the parts, if they are consecutive slices of one group."""
    first = parts[0]
    if not isinstance(first, SlicedRows):
        return None
    at = first.start
    for p in parts:
        if not (isinstance(p, SlicedRows) and p.source is first.source and p.start == at):
            return None
        at += p.count
    return SlicedRows(first.source, first.spec, first.start, at - first.start)


def _concat(parts: list[ModelRows]) -> ModelRows:
    first = parts[0]
    cat = pa.concat_arrays
    return ModelRows(first.spec, cat([p.inference_id for p in parts]), cat([p.timestamp for p in parts]),
                     cat([p.prediction for p in parts]), cat([p.label for p in parts]),
                     {k: cat([p.values[k] for p in parts]) for k in first.values},
                     np.concatenate([p.partition for p in parts]), np.concatenate([p.offset for p in parts]),
                     np.concatenate([p.origin for p in parts]))


def _taken(rows: ModelRows, order: np.ndarray) -> ModelRows:
    """The rows in `order` (positions), every column."""
    index = pa.array(order)
    take = lambda arr: arr.take(index)  # noqa: E731
    return ModelRows(rows.spec, take(rows.inference_id), take(rows.timestamp), take(rows.prediction),
                     take(rows.label), {k: take(v) for k, v in rows.values.items()}, rows.partition,
                     rows.offset, rows.origin[order])


_INVALID = object()


def _lenient_loads(raw: bytes):
    """What orjson refuses but Python's json reads: NaN/Infinity literals (as
    Python's json writes them), integers beyond 64 bits, lone surrogates. Such
    a message then fails validation naming the field (non_finite,
    out_of_range, invalid_text) instead of being just invalid_json. Nesting
    deeper than the interpreter's recursion limit stays invalid_json."""
    try:
        return json.loads(raw.decode("utf-8"))  # UTF-8 only: Python's json would also guess UTF-16/32
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _INVALID


def _kind(value) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


Bad = dict[int, tuple[str, str]]


def _columns(spec: ModelSpec, objs: list[dict], origin: np.ndarray) -> tuple[ModelRows | None, Bad]:
    """Validate JSON objects of one model (or layout) into columns."""
    return _validate(spec, _JsonSource(objs), origin)


def _columns_guarded(spec: ModelSpec, objs: list[dict], origin: np.ndarray) -> tuple[ModelRows | None, Bad]:
    return _guarded(_columns, spec, objs, origin)


def _guarded(validate, spec: ModelSpec, objs: list[dict], origin: np.ndarray):
    """`validate(spec, objs, origin)`, and if it fails (a bug), each row on its
    own: the rows that fail alone are `internal_error`, the others go on."""
    try:
        return validate(spec, objs, origin)
    except Exception:  # noqa: BLE001
        log.exception("validating %d rows of layout %s together failed; validating them one by one",
                      len(objs), spec.model_id)
    good, bad = [], {}
    for j, obj in enumerate(objs):
        try:
            rows, one_bad = validate(spec, [obj], origin[j:j + 1])
        except Exception as exc:  # noqa: BLE001
            bad[j] = ("internal_error", f"validation failed: {_error(exc)}")
            continue
        if one_bad:
            bad[j] = one_bad[0]
        if rows is not None:
            good.append(rows)
    if not good:
        return None, bad
    if isinstance(good[0], LabelRows):
        return LabelRows.concat(good), bad
    return _concat(good), bad


def _validate(spec: ModelSpec, src: "_JsonSource | _ArrowSource",
              origin: np.ndarray) -> tuple[ModelRows | None, Bad]:
    """The checks every row goes through, whatever format it came in.

    The order of the checks is the order problems are reported in: the first
    problem found in a row is its reason.
    """
    bad = src.bad
    inference_id = _inference_ids(src)
    timestamp = _check_time_range(src.timestamp(), bad)
    src.group("features", required=True)
    target = Column("prediction", spec.prediction_type)
    prediction = _check(src.top("prediction", target, "wrong_type"), "prediction", bad, "missing_field")
    label = _check(src.top("label", target, "wrong_type"), "label", bad, None)
    values: dict[str, pa.Array] = {}
    for col in spec.features:
        arr = src.nested("features", col, f"feature {col.name!r}", "wrong_feature_type")
        values[col.name] = _check(arr, f"feature {col.name!r}", bad, None if col.nullable else "missing_feature")
    if spec.attributes:
        src.group("attributes", required=False)
        for col in spec.attributes:
            arr = src.nested("attributes", col, f"attribute {col.name!r}", "wrong_feature_type")
            values[col.name] = _check(arr, f"attribute {col.name!r}", bad, None)
    if len(bad) == src.n:
        return None, bad
    keep = mask = None
    if bad:
        mask = np.ones(src.n, bool)
        mask[list(bad)] = False
        keep = pa.array(mask)

    def kept(arr: pa.Array) -> pa.Array:
        return arr if keep is None else arr.filter(keep)

    rows = ModelRows(spec, kept(inference_id), kept(timestamp), kept(prediction), kept(label),
                     {k: kept(v) for k, v in values.items()}, np.empty(0), np.empty(0),
                     origin if mask is None else origin[mask])
    return rows, bad


def _inference_ids(src: "_JsonSource | _ArrowSource") -> pa.Array:
    bad = src.bad
    inference_id = _check(src.top("inference_id", _ID, "wrong_type"), "inference_id", bad, "missing_field")
    if len(inference_id) and (pc.max(pc.utf8_length(inference_id)).as_py() or 0) > MAX_ID_CHARS:
        too_long = pc.fill_null(pc.greater(pc.utf8_length(inference_id), MAX_ID_CHARS), False)
        for j in np.flatnonzero(too_long.to_numpy(zero_copy_only=False)):
            _mark(bad, int(j), "out_of_range", f"inference_id: {len(inference_id[int(j)].as_py()):,} characters, "
                  f"the limit is {MAX_ID_CHARS:,}")
    return inference_id


def _validate_labels(spec: ModelSpec, objs, origin: np.ndarray) -> tuple[LabelRows | None, Bad]:
    """Label updates (JSON objects, or an Arrow table): an inference id and a
    label of the model's prediction type, nothing else read."""
    src = objs if isinstance(objs, _ArrowSource) else _JsonSource(objs)
    bad = src.bad
    inference_id = _inference_ids(src)
    label = _check(src.top("label", Column("label", spec.prediction_type), "wrong_type"), "label", bad,
                   "missing_field")
    if len(bad) == src.n:
        return None, bad
    if not bad:
        return LabelRows(spec, inference_id, label, origin), bad
    mask = np.ones(src.n, bool)
    mask[list(bad)] = False
    keep = pa.array(mask)
    return LabelRows(spec, inference_id.filter(keep), label.filter(keep), origin[mask]), bad


def _check_time_range(ts: pa.Array, bad: Bad) -> pa.Array:
    """Timestamps ClickHouse's DateTime64 can hold, from epoch-ms's plausible
    start (earlier values are seconds, see _MIN_EPOCH_MS) to 2299."""
    if ts.null_count == len(ts):
        return ts
    as_ms = ts.cast(pa.int64())
    low, high = pc.min_max(as_ms).values()
    future = _FUTURE.get()
    latest = _MAX_EPOCH_MS if future is None else min(_MAX_EPOCH_MS, future[0] + int(future[1] * 1000))
    if low.as_py() >= _MIN_EPOCH_MS and high.as_py() <= latest:
        return ts
    outside = pc.fill_null(pc.or_(pc.less(as_ms, _MIN_EPOCH_MS), pc.greater_equal(as_ms, _MAX_EPOCH_MS)), False)
    for j in np.flatnonzero(outside.to_numpy(zero_copy_only=False)):
        ms = as_ms[int(j)].as_py()
        _mark(bad, int(j), "out_of_range", f"timestamp: {ms} ms since the epoch is outside 1973-2299")
    if future is not None:
        ahead = pc.fill_null(pc.and_(pc.greater(as_ms, latest), pc.invert(outside)), False)
        for j in np.flatnonzero(ahead.to_numpy(zero_copy_only=False)):
            ms = as_ms[int(j)].as_py()
            _mark(bad, int(j), "future_timestamp",
                  f"timestamp: {datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat()} is "
                  f"{(ms - future[0]) / 1000:.0f} s ahead of this worker's clock, more than "
                  f"ENRICHER_MAX_FUTURE_SKEW allows ({future[1]:g} s): a producer's clock, or its units?")
        outside = pc.or_(outside, ahead)
    return pc.if_else(outside, pa.scalar(None, ts.type), ts)


class _JsonSource:
    """Fields of decoded JSON objects, one Arrow conversion per field."""

    def __init__(self, objs: list[dict]):
        self.objs = objs
        self.n = len(objs)
        self.bad: Bad = {}
        self.groups: dict[str, list[dict]] = {}

    def top(self, name: str, col: Column, wrong: str) -> pa.Array:
        return _from_values([o.get(name) for o in self.objs], col, name, self.bad, wrong)

    def timestamp(self) -> pa.Array:
        return _timestamps([o.get("timestamp") for o in self.objs], self.bad)

    def group(self, name: str, required: bool) -> None:
        dicts = [o.get(name) for o in self.objs]
        for j, d in enumerate(dicts):
            if type(d) is not dict:
                if d is not None or required:
                    _mark(self.bad, j, "missing_field" if d is None else "wrong_type",
                          f"{name}: expected an object, got {_kind(d)}")
                dicts[j] = {}
        self.groups[name] = dicts

    def nested(self, group: str, col: Column, what: str, wrong: str) -> pa.Array:
        return _from_values([d.get(col.name) for d in self.groups[group]], col, what, self.bad, wrong)


class _ArrowSource:
    """Fields of an Arrow table: casts, never row-by-row conversion."""

    def __init__(self, table: pa.Table):
        self.table = table
        self.n = table.num_rows
        self.bad: Bad = {}

    def _all(self, reason: str, detail: str) -> None:
        for j in range(self.n):
            _mark(self.bad, j, reason, detail)

    def top(self, name: str, col: Column, wrong: str) -> pa.Array:
        if name not in self.table.column_names:
            return pa.nulls(self.n, pa.float64() if col.numeric else pa.string())
        return self._cast(self.table.column(name).combine_chunks(), col, name, wrong)

    def timestamp(self) -> pa.Array:
        if "timestamp" not in self.table.column_names:
            self._all("missing_field", "timestamp: missing")
            return pa.nulls(self.n, TS_TYPE)
        arr = self.table.column("timestamp").combine_chunks()
        if pa.types.is_dictionary(arr.type):
            arr = arr.cast(arr.type.value_type)
        if pa.types.is_timestamp(arr.type):
            if arr.type.tz is None:
                arr = pc.assume_timezone(arr, "UTC")
            # Sub-millisecond precision is dropped, not an error; the range is checked after.
            return arr.cast(pa.timestamp(arr.type.unit, tz="UTC")).cast(TS_TYPE, safe=False)
        if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
            floats = arr.cast(pa.float64(), safe=False)
            finite = pc.fill_null(pc.is_finite(floats), True).to_numpy(zero_copy_only=False)
            small = pc.fill_null(pc.less(floats, _MIN_EPOCH_MS), False).to_numpy(zero_copy_only=False)
            large = pc.fill_null(pc.greater_equal(floats, _MAX_EPOCH_MS), False).to_numpy(zero_copy_only=False)
            for j in np.flatnonzero(small | ~finite):
                _mark(self.bad, int(j), "invalid_timestamp",
                      f"timestamp: {arr[int(j)].as_py()!r} is not epoch milliseconds (seconds? multiply by 1000)")
            for j in np.flatnonzero(large & finite):
                _mark(self.bad, int(j), "out_of_range",
                      f"timestamp: {arr[int(j)].as_py()!r} ms since the epoch is outside 1973-2299")
            usable = pa.array(finite & ~small & ~large)
            return pc.if_else(usable, floats, pa.scalar(None, pa.float64())).cast(pa.int64(), safe=False).cast(TS_TYPE)
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
            return _timestamps(arr.to_pylist(), self.bad)
        self._all("wrong_type", f"timestamp: column of type {arr.type}, expected a timestamp, int64 or string")
        return pa.nulls(self.n, TS_TYPE)

    def group(self, name: str, required: bool) -> None:
        if name not in self.table.column_names:
            if required:
                self._all("missing_field", f"{name}: missing")
        elif not pa.types.is_struct(self.table.schema.field(name).type):
            self._all("wrong_type", f"{name}: column of type {self.table.schema.field(name).type}, expected a struct")

    def nested(self, group: str, col: Column, what: str, wrong: str) -> pa.Array:
        field = self.table.schema.field(group) if group in self.table.column_names else None
        if field is None or not pa.types.is_struct(field.type) or field.type.get_field_index(col.name) < 0:
            return pa.nulls(self.n, pa.float64() if col.numeric else pa.string())
        return self._cast(pc.struct_field(self.table.column(group).combine_chunks(), col.name), col, what, wrong)

    def _cast(self, arr: pa.Array, col: Column, what: str, wrong: str) -> pa.Array:
        t = arr.type
        if pa.types.is_dictionary(t):
            arr, t = arr.cast(t.value_type), t.value_type
        if col.numeric:
            ok = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t)
            target = pa.float64()
        else:
            ok = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t) or pa.types.is_null(t)
            target = pa.string()
        if not ok:
            self._all(wrong, f"{what}: column of type {t}, expected {'numbers' if col.numeric else 'strings'}")
            return pa.nulls(self.n, target)
        # unsafe: a 64-bit integer becomes the nearest float64, as it does from JSON
        return arr.cast(target, safe=False)


def _arrow_message(table: pa.Table, i: int, base: int, specs, out: ParsedBatch, partitions,
                   offsets) -> dict[str, "ModelRows | LabelRows"]:
    """Validate one Arrow IPC message, which may hold rows of several models
    (inferences, or label updates: a stream with a label and no features)."""
    def dead(rows, reason, detail, model_id):
        for j in rows:
            out.dead.append(DeadLetter(to_ipc(table.slice(int(j), 1)), reason, detail, model_id,
                                       partitions[i], offsets[i], int(j)))

    if "model_id" not in table.column_names:
        dead(range(table.num_rows), "missing_field", "model_id: missing", None)
        return {}
    ids = table.column("model_id").combine_chunks()
    if pa.types.is_dictionary(ids.type):
        ids = ids.cast(ids.type.value_type)
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        dead(range(table.num_rows), "wrong_type", f"model_id: column of type {ids.type}, expected strings", None)
        return {}
    dead(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False)), "missing_field", "model_id: missing", None)
    found = {}
    for model_id in pc.unique(ids.drop_null()).to_pylist():
        positions = np.flatnonzero(pc.equal(ids, model_id).fill_null(False).to_numpy(zero_copy_only=False))
        spec = specs(model_id)
        if spec is None:
            dead(positions, "unknown_model", f"model {_short(model_id)} is not registered", model_id)
            continue
        part = table.take(positions) if len(positions) < table.num_rows else table
        if "features" not in table.column_names and "label" in table.column_names:  # label updates
            labels, bad = _validate_labels(spec, _ArrowSource(part), base + positions.astype(np.int64))
            for j, (reason, detail) in sorted(bad.items()):
                dead([positions[j]], reason, detail, model_id)
            if labels is not None:
                found[model_id] = labels
            continue
        rows, bad = _validate(spec, _ArrowSource(part), base + positions.astype(np.int64))
        for j, (reason, detail) in sorted(bad.items()):
            dead([positions[j]], reason, detail, model_id)
        if rows is not None:
            rows.partition = np.full(rows.num_rows, partitions[i], np.uint32)
            rows.offset = np.full(rows.num_rows, offsets[i], np.uint64)
            found[model_id] = rows
    return found


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _mark(bad: Bad, j: int, reason: str, detail: str) -> None:
    # The first problem found in a row is the one reported.
    bad.setdefault(j, (reason, detail))


_ID = Column("inference_id", "categorical")


def _from_values(vals: list, col: Column, what: str, bad: Bad, wrong: str) -> pa.Array:
    """One Arrow array from Python values in one conversion; only if that fails
    are the values looked at one by one, to mark the rows that do not fit."""
    try:
        return pa.array(vals, pa.float64() if col.numeric else pa.string())
    except Exception:  # noqa: BLE001 - ArrowInvalid/TypeError, OverflowError, UnicodeEncodeError, RecursionError...
        return _typed_slowly(vals, col, what, bad, wrong)


def _check(arr: pa.Array, what: str, bad: Bad, missing: str | None) -> pa.Array:
    """Mark null values (where the field is required) and non-finite numbers."""
    if missing is not None and arr.null_count:
        for j in np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)):
            _mark(bad, int(j), missing, f"{what}: missing")
    # pc.all skips nulls: the common, all-finite case costs two kernel calls.
    if pa.types.is_floating(arr.type) and arr.null_count < len(arr) and \
            pc.all(pc.is_finite(arr)).as_py() is False:
        finite = pc.fill_null(pc.is_finite(arr), True)
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
            except OverflowError:  # an integer beyond float range (only Python's json reads those)
                _mark(bad, j, "out_of_range", f"{what}: an integer of {len(str(v))} digits is beyond float64")
                clean.append(None)
        elif not col.numeric and t is str:
            if _encodable(v):
                clean.append(v)
            else:
                _mark(bad, j, "invalid_text", f"{what}: {_short(v)} is not valid Unicode (a lone surrogate)")
                clean.append(None)
        elif not col.numeric and t is int:
            clean.append(str(v))
        else:
            expected = "a number" if col.numeric else "a string"
            _mark(bad, j, wrong, f"{what}: expected {expected}, got {_kind(v)} {_short(v)}")
            clean.append(None)
    return pa.array(clean, pa.float64() if col.numeric else pa.string())


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Bounded at every level: a value may be nested hundreds deep or a megabyte long.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 36, 36, 4, 4


def _short(v) -> str:
    text = _REPR.repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _timestamps(vals: list, bad: Bad) -> pa.Array:
    # Fast paths: a batch of all epoch-ms numbers, or of ISO strings with offsets.
    # (Their range is checked by the caller, _check_time_range.)
    try:
        arr = pa.array(vals, pa.int64())
        if arr.null_count == 0 and pc.min(arr).as_py() >= _MIN_EPOCH_MS:
            return arr.cast(TS_TYPE)
    except Exception:  # noqa: BLE001 - not all integers: the next path, or row by row
        pass
    try:
        arr = pa.array(vals, pa.string())
        if arr.null_count == 0:
            return arr.cast(TS_TYPE)
    except Exception:  # noqa: BLE001
        pass
    out = []
    for j, v in enumerate(vals):
        ms = None
        t = type(v)
        if v is None:
            _mark(bad, j, "missing_field", "timestamp: missing")
        elif t is int or t is float:
            if t is float and not math.isfinite(v) or v < _MIN_EPOCH_MS:
                _mark(bad, j, "invalid_timestamp",
                      f"timestamp: {_short(v)} is not epoch milliseconds (seconds? multiply by 1000)")
            elif v >= _MAX_EPOCH_MS:
                _mark(bad, j, "out_of_range", f"timestamp: {_short(v)} ms since the epoch is after 2299")
            else:
                ms = int(v)
        elif t is str:
            try:
                dt = datetime.fromisoformat(v)
                if dt.tzinfo is None:
                    dt = dt.replace(tzinfo=timezone.utc)
                ms = int(dt.timestamp() * 1000)
            except (ValueError, OverflowError, OSError):  # incl. offsets that push it out of range
                _mark(bad, j, "invalid_timestamp", f"timestamp: {_short(v)} is not ISO-8601")
        else:
            _mark(bad, j, "wrong_type", f"timestamp: expected a string or a number, got {_kind(v)}")
        out.append(ms)
    return pa.array(out, pa.int64()).cast(TS_TYPE)
