"""The catalog: every enrichment by name, and what holds for all of them together.

A new enrichment is one module and one line in ENRICHMENTS. The functions here
ask every enrichment (which columns a model gets, whether an output is what its
enrichment declares); models/enrichment.py holds what one enrichment is, and
imports nothing of this module, so the enrichments can import it.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from .anomaly import AnomalyDetection
from .bias import BiasMitigation
from .enrichment import Output, usable, version_column
from .explainability import Explainability
from .hotspots import Hotspots
from .spec import ModelSpec

#: Every enrichment by name. A new enrichment is one module and one line here.
ENRICHMENTS = {e.name: e for e in (AnomalyDetection(), Explainability(), BiasMitigation(), Hotspots())}


@functools.lru_cache(maxsize=8192)
def model_outputs(spec: ModelSpec) -> tuple[tuple[str, tuple[Output, ...]], ...]:
    """Every enrichment the model can use with its outputs, its version column
    last (cached: the stream asks for every batch)."""
    out = []
    for name, enrichment in ENRICHMENTS.items():
        if usable(enrichment, spec):
            out.append((name, tuple(enrichment.outputs(spec))
                        + (Output(version_column(name), pa.uint32(), version_column(name),
                                  doc=f"the {name} artifact version that made this row's values"),)))
    return tuple(out)


def checked_output(name: str, spec: ModelSpec, out, num_rows: int) -> dict[str, pa.Array]:
    """An enrichment's output as the rest of the engine expects it: exactly the
    declared columns (by view name), one value per row, of the declared types
    (or castable to them). Anything else raises ValueError. Serving calls it
    inside its guard (that enrichment's columns are NULL for the batch,
    counted); a training run's validate step calls it on reference rows (the
    run fails, saying why)."""
    declared = {o.name: o.type for o in ENRICHMENTS[name].outputs(spec)}
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


def out_of_bounds(name: str, spec: ModelSpec, out: dict[str, pa.Array]) -> str | None:
    """What is wrong with an enrichment's checked output on reference rows, if anything:
    a float column with a value that is not finite (NULL is a value not computed: fine),
    or outside the bounds its Output declares. The training run's validate step refuses
    such a result; the conformance check fails an enrichment that produces one."""
    declared = {o.name: o for o in ENRICHMENTS[name].outputs(spec)}
    for column, array in out.items():
        if not pa.types.is_floating(array.type):
            continue
        values = array.drop_null().to_numpy(zero_copy_only=False)
        if not np.isfinite(values).all():
            return f"{name}.{column} is not finite on reference rows (use NULL for a value not computed)"
        bounds = declared[column].bounds
        if bounds and not ((values >= bounds[0]) & (values <= bounds[1])).all():
            return f"{name}.{column} leaves [{bounds[0]}, {bounds[1]}] on reference rows"
    return None
