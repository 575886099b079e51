"""The surface every enrichment shares (version 2), after scikit-learn's estimator contract.

An enrichment *fits* an artifact on a model's reference data and the fitted
artifact *transforms* a validated batch of inferences into the columns it adds.
Everything the engine needs to know about an enrichment it asks the
enrichment, per model:

- `outputs(spec)`: the columns it adds for that model (a per-feature output is
  one column per feature), each with its type, its name in the model's view and
  its column in storage;
- `reserved`: the view names it may ever use, so that a feature that would
  collide is refused at registration (`ModelSpec.from_json`);
- `check_model(spec, reference)`: what a model needs to use it (a task, a
  sensitive attribute, labels in the reference...); a toggle that switches it
  on for a model that cannot use it is refused with that reason, before any
  training;
- `check_config`, `fit`, `load`, `check_quality` (the bar a fitted artifact's
  measured `quality` must pass before it is published), and the fitted
  artifact's `transform`, `to_blobs` and `quality`;
- optionally `stream_training(config)`: what it learns from the enriched
  stream besides the reference data (labelled rows of a recent window, how
  many at most) and how often it retrains on its own (`StreamTraining`);
  without it, an enrichment learns from the reference data alone and is
  retrained only when its model or settings change or a user asks;
- optionally `pool(artifacts)`: which fitted artifacts (of many models) can be
  applied together, as `(pool, positions)` pairs; a pool's `features` are the
  columns it reads and `transform(batch, member)` its outputs for a batch of
  several models' rows (`member[i]`: row i's artifact's position in its pool),
  each equal to what the model's own artifact gives (a stream spread over a
  thousand models then pays one model's per-batch cost per pool).

Adding an enrichment is one module implementing this and one line in
`models.ENRICHMENTS`; nothing in the streaming service, the training steps or
the store changes. `models.conformance.check_enrichment` checks a new one the
way the suite checks ours. This package knows nothing of Kafka or ClickHouse:
a storage column is only a stable name, which `enricher/store/clickhouse.py` turns
into a column of the shared table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import numpy as np
import pyarrow as pa

from .artifact import Manifest
from .spec import ModelSpec, SpecError

#: The Arrow types an output may have (the store maps each to a column type).
OUTPUT_TYPES = (pa.float64(), pa.float32(), pa.string(), pa.int64(), pa.uint32())


class Unusable(SpecError):
    """An enrichment a model cannot use; the message says what the model lacks."""


@dataclass(frozen=True)
class Output:
    """One column an enrichment adds for a model.

    `name` is the column in the model's view (what users query), `storage` its
    column in the shared storage table: stable for the model's life, so a
    per-feature output follows the feature's storage slot, not its name.
    `bounds`, where given, are checked on reference rows before an artifact is
    published (a value outside them fails the training run).
    """

    name: str
    type: pa.DataType
    storage: str
    bounds: tuple[float, float] | None = None
    doc: str = ""


def per_feature(prefix: str, spec: ModelSpec, type_: pa.DataType = pa.float64(), doc: str = "") -> list[Output]:
    """One output per feature: `<prefix><feature>` in the view, `<prefix><slot>` in storage."""
    slots = spec.storage_columns
    return [Output(f"{prefix}{c.name}", type_, f"{prefix}{slots[c.name]}", doc=doc.format(feature=c.name))
            for c in spec.features]


class InferenceBatch:
    """A validated batch of one model's inferences, column by column.

    `columns` maps each feature (and attribute, where sent) to an Arrow array of
    `num_rows` values: float64 for numeric, string for categorical. `prediction`
    and `label` are float64 for a numeric prediction type, string otherwise
    (label NULL where not sent); `inference_id` strings; `timestamp` Arrow
    timestamps (ms, UTC). Training's validate step builds one from reference
    rows (ids `reference-<row>`, the time of the run).
    """

    __slots__ = ("spec", "columns", "num_rows", "prediction", "label", "inference_id", "timestamp")

    def __init__(self, spec: ModelSpec, columns: Mapping[str, pa.Array], num_rows: int, *,
                 prediction: pa.Array, label: pa.Array, inference_id: pa.Array, timestamp: pa.Array):
        self.spec = spec
        self.columns = columns
        self.num_rows = num_rows
        self.prediction = prediction
        self.label = label
        self.inference_id = inference_id
        self.timestamp = timestamp

    def slice(self, offset: int, length: int) -> "InferenceBatch":
        """Rows offset..offset+length (zero-copy)."""
        n = max(0, min(length, self.num_rows - offset))
        return InferenceBatch(self.spec, {k: v.slice(offset, n) for k, v in self.columns.items()}, n,
                              prediction=self.prediction.slice(offset, n), label=self.label.slice(offset, n),
                              inference_id=self.inference_id.slice(offset, n),
                              timestamp=self.timestamp.slice(offset, n))

    @classmethod
    def concat(cls, batches: list["InferenceBatch"], features: list[str]) -> "InferenceBatch":
        """Batches (of several models of one layout) one after the other, columns only
        `features`, spec the first's: what a pool gets (the conformance check, tests)."""
        def joined(get):
            return pa.concat_arrays([get(b) for b in batches])

        return cls(batches[0].spec, {f: joined(lambda b, f=f: b.columns[f]) for f in features},
                   sum(b.num_rows for b in batches), prediction=joined(lambda b: b.prediction),
                   label=joined(lambda b: b.label), inference_id=joined(lambda b: b.inference_id),
                   timestamp=joined(lambda b: b.timestamp))

    @classmethod
    def from_reference(cls, spec: ModelSpec, table: pa.Table) -> "InferenceBatch":
        """Normalised reference rows as a batch (training's validate step, the conformance check)."""
        import time

        n = table.num_rows

        def col(name: str, type_: pa.DataType) -> pa.Array:
            if name in table.column_names:
                return table.column(name).combine_chunks()
            return pa.nulls(n, type_)

        value_type = pa.float64() if spec.prediction_type == "numeric" else pa.string()
        return cls(spec, {c.name: table.column(c.name).combine_chunks() for c in spec.columns
                          if c.name in table.column_names}, n,
                   prediction=col("prediction", value_type), label=col("label", value_type),
                   inference_id=pa.array([f"reference-{i}" for i in range(n)], pa.string()),
                   timestamp=pa.array(np.full(n, int(time.time() * 1000), "datetime64[ms]"),
                                      pa.timestamp("ms", tz="UTC")))


@dataclass(frozen=True)
class ModelFile:
    """The user's own model, registered with the model (`--model-file`): its file name and bytes."""

    name: str
    data: bytes


class Fitted(Protocol):
    parameters: dict
    #: What training measured (e.g. a surrogate's fidelity), JSON; published with the
    #: artifact (`published_parameters`), shown in the enrichment's status.
    quality: dict

    def to_blobs(self) -> dict[str, bytes]:
        """The files that make up the artifact (name -> bytes)."""

    def transform(self, batch: InferenceBatch) -> dict[str, pa.Array]:
        """The enrichment's outputs (by view name) for every row of the batch, in order."""


@dataclass(frozen=True)
class StreamTraining:
    """What an enrichment learns from the enriched stream besides the reference data.

    `window`: the labelled rows of the last `window` seconds; `max_rows`: at most
    that many (0: the reference data alone), sampled by a hash of the inference
    id (the training steps read them); `every`: retrain on a schedule, every
    that many seconds (None: only when the model or settings change, or on
    demand). `texts` the same as the user wrote them, for messages."""

    window: float
    max_rows: int
    every: float | None
    texts: dict


#: A boolean column the training steps add to the rows of an enrichment that learns from the
#: stream: true for a row drawn from the stream, false for a reference row (a name no feature
#: can have: column names start with a letter).
FROM_STREAM = "_from_stream"


def stream_training(enrichment: "Enrichment", config: dict) -> StreamTraining | None:
    """The enrichment's StreamTraining for these settings, or None (reference data alone)."""
    ask = getattr(enrichment, "stream_training", None)
    return ask(config) if ask is not None else None


class Enrichment(Protocol):
    name: str
    #: View column names this enrichment may use for any model; "x_*" is a prefix.
    reserved: tuple[str, ...]

    def outputs(self, spec: ModelSpec) -> list[Output]:
        """Columns this enrichment adds to the model's rows."""

    def check_model(self, spec: ModelSpec, reference: pa.Schema | None = None) -> None:
        """Raise `Unusable` saying why, if this model cannot use the enrichment.
        `reference` (the normalised reference data's schema) where known: a
        requirement on it (labels, say) is checked only then."""

    def check_config(self, config: dict) -> dict:
        """Validate settings when they are set; returns them with defaults filled in."""

    def check_quality(self, quality: dict, config: dict) -> None:
        """Raise ValueError saying why, if a fitted artifact's `quality` is below what the
        config asks: the training run's validate step fails, the previous version serves."""

    def fit(self, spec: ModelSpec, reference: pa.Table, config: dict, model_file: ModelFile | None = None) -> Fitted:
        """Learn from normalised reference data (and the model's own file, where registered
        and the enrichment uses it)."""

    def load(self, spec: ModelSpec, manifest: Manifest, blobs: dict[str, bytes]) -> Fitted:
        """Rebuild a fitted artifact from verified bytes."""


def published_parameters(fitted: Fitted) -> dict:
    """What a manifest records of a fitted artifact: its parameters, and its quality if any."""
    return {**fitted.parameters, **({"quality": fitted.quality} if fitted.quality else {})}


def version_column(name: str) -> str:
    """The column saying which artifact version made an enrichment's values (added by the engine)."""
    return f"{name}_version"


def reserves(enrichment: Enrichment, column: str) -> bool:
    """Whether a view column name belongs to this enrichment."""
    if column == version_column(enrichment.name):
        return True
    return any(column.startswith(r[:-1]) if r.endswith("*") else column == r for r in enrichment.reserved)


def usable(enrichment: Enrichment, spec: ModelSpec) -> bool:
    """Whether the model can use it, as far as its spec says (a model's view
    has the columns of every enrichment it can use, on or off)."""
    try:
        enrichment.check_model(spec)
    except Unusable:
        return False
    return True


