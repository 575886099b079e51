"""The surface every enrichment shares, after scikit-learn's estimator contract.

An enrichment *fits* an artifact on a model's reference data and the fitted
artifact *transforms* a batch of inferences into the columns it adds. Adding an
enrichment is one module implementing this and one line in `models.ENRICHMENTS`;
nothing in the streaming service changes.
"""

from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np
import pyarrow as pa

from .artifact import Manifest
from .spec import ModelSpec


class FeatureBatch:
    """A columnar batch of validated inferences for one model.

    `columns` maps each feature (and attribute, where sent) to an Arrow array
    of `num_rows` values: float64 for numeric, string for categorical.
    """

    __slots__ = ("columns", "num_rows")

    def __init__(self, columns: Mapping[str, pa.Array], num_rows: int):
        self.columns = columns
        self.num_rows = num_rows


class Fitted(Protocol):
    parameters: dict

    def to_blobs(self) -> dict[str, bytes]:
        """The files that make up the artifact (name -> bytes)."""

    def transform(self, batch: FeatureBatch) -> dict[str, pa.Array]:
        """The enrichment's columns for every row of the batch, in order."""


class Enrichment(Protocol):
    name: str

    def output_columns(self) -> dict[str, pa.DataType]:
        """Columns this enrichment adds to the enriched rows, the same for every
        model (a per-feature output would be one map column)."""

    def check_config(self, config: dict) -> dict:
        """Validate settings when they are set; returns them with defaults filled in."""

    def fit(self, spec: ModelSpec, reference: pa.Table, config: dict) -> Fitted:
        """Learn from normalised reference data."""

    def load(self, spec: ModelSpec, manifest: Manifest, blobs: dict[str, bytes]) -> Fitted:
        """Rebuild a fitted artifact from verified bytes."""


def checked_output(name: str, out, num_rows: int) -> dict[str, pa.Array]:
    """An enrichment's output as the rest of the engine expects it: exactly the
    declared columns, one value per row, of the declared types (or castable to
    them). Anything else raises ValueError. Serving calls it inside its guard
    (that enrichment's columns are NULL for the batch, counted); a training
    run's validate step calls it on reference rows (the run fails, saying why)."""
    from . import ENRICHMENTS

    declared = ENRICHMENTS[name].output_columns()
    if not isinstance(out, dict) or set(out) != set(declared):
        got = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise ValueError(f"{name} returned {got}, it declares {sorted(declared)}")
    checked = {}
    for col, arrow_type in declared.items():
        arr = out[col]
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        elif not isinstance(arr, pa.Array):
            arr = pa.array(np.asarray(arr))
        if len(arr) != num_rows:
            raise ValueError(f"{name}.{col}: {len(arr)} values for {num_rows} rows")
        checked[col] = arr if arr.type == arrow_type else arr.cast(arrow_type)
    return checked
