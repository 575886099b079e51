"""Where a model's columns are kept in storage: stable slot numbers.

Every model's rows share one storage table (one insert per batch, whatever
the number of models), so a feature cannot have a column of its own name
there: the table has numbered typed columns instead, `n0, n1, ...` for
numeric values and `c0, c1, ...` for categorical ones, and each model's view
names them after its features. A model's slots are assigned when it is
registered and never move: a feature keeps its slot when the model is
registered again with other features, a new feature takes a slot no column of
that model ever had, and a dropped feature's slot stays reserved (its old
values are still there, and come back if the feature does). A feature whose
type changes gets a slot of the new kind.

This module knows nothing of the store; `enricher/store/clickhouse.py` turns slots
into columns.
"""

from __future__ import annotations

from typing import Iterable

from .spec import Column

KINDS = {"numeric": "n", "categorical": "c"}


def assign(columns: Iterable[Column], previous: dict | None = None) -> dict:
    """Every slot the model ever had, plus new ones for columns that had none:
    {"numeric": {name: index}, "categorical": {name: index}}."""
    out = {kind: dict((previous or {}).get(kind, {})) for kind in KINDS}
    for col in columns:
        taken = out[col.type]
        if col.name not in taken:
            taken[col.name] = max(taken.values(), default=-1) + 1
    return out


def column_names(columns: Iterable[Column], assigned: dict) -> tuple[tuple[str, str], ...]:
    """(column name, storage column) for the given columns, e.g. ("age", "n3")."""
    return tuple((c.name, f"{KINDS[c.type]}{assigned[c.type][c.name]}") for c in columns)
