"""What a model is: its id, task, inputs and non-input attributes.

The spec is read from the user's schema file, validated here once, and then
shared by training (which fits artifacts on reference data) and serving
(which validates inferences and lays out the ClickHouse table).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from enricher.errors import EnricherError

MODEL_ID_RULE = r"^[a-z][a-z0-9_]{0,62}$"
_MODEL_ID = re.compile(MODEL_ID_RULE)
# Column names reach SQL; they are quoted there too, but a plain rule keeps
# every downstream tool (Grafana, pandas, SQL by hand) simple.
COLUMN_NAME_RULE = r"^[A-Za-z][A-Za-z0-9_]{0,127}$"
_COLUMN_NAME = re.compile(COLUMN_NAME_RULE)

TASKS = ("binary_classification", "multiclass_classification", "regression")
VALUE_TYPES = ("numeric", "categorical")
# Names the enriched table uses for its own columns; a feature may not take them.
# Each enrichment reserves its own (`Enrichment.reserved`), checked here too.
RESERVED_COLUMNS = frozenset(
    {"model_id", "inference_id", "timestamp", "prediction", "label", "label_at", "features", "attributes"}
)


def _reserved_by(name: str) -> str | None:
    """What a column name is reserved for, if anything."""
    if name in RESERVED_COLUMNS:
        return "the enriched table's own columns"
    # The one two-way rule between modules: a schema may not name a column an enrichment
    # outputs, and the enrichments are written against the schema (ModelSpec). So the
    # check imports the catalog here, when a schema is read, after both are loaded.
    from .catalog import ENRICHMENTS
    from .enrichment import reserves

    for enrichment in ENRICHMENTS.values():
        if reserves(enrichment, name):
            return f"the {enrichment.name} enrichment's columns"
    return None


class SpecError(EnricherError, ValueError):
    """A model id or schema the user must correct; the message says how."""


def check_model_id(model_id: Any) -> str:
    if not isinstance(model_id, str) or not _MODEL_ID.match(model_id):
        raise SpecError(
            f"invalid model id {model_id!r}: a model id must match {MODEL_ID_RULE} "
            "(a lowercase letter, then up to 62 lowercase letters, digits or underscores)"
        )
    return model_id


@dataclass(frozen=True)
class Column:
    """One feature or attribute of a model."""

    name: str
    type: str  # "numeric" or "categorical"
    sensitive: bool = False
    # A feature the model takes missing (null in a message): enriched, not dead-lettered.
    nullable: bool = False

    @property
    def numeric(self) -> bool:
        return self.type == "numeric"


_LAYOUT_IDS: dict[tuple, int] = {}  # a process sees a handful of layouts, however many models


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    task: str
    features: tuple[Column, ...]
    attributes: tuple[Column, ...] = ()
    positive_threshold: float = 0.5
    prediction_type: str = "numeric"
    # Each column's storage column, ("age", "n3"): assigned by the registry and
    # stable across registrations (models/slots.py). Empty for a spec that did
    # not come from a registry: its columns then take the first slots in order.
    slots: tuple[tuple[str, str], ...] = ()

    @property
    def storage_columns(self) -> dict[str, str]:
        """Column name -> storage column ("n<i>" numeric, "c<i>" categorical)."""
        if self.slots:
            return dict(self.slots)
        from .slots import assign, column_names  # the same two-way rule: slots place ModelSpec's columns

        return dict(column_names(self.columns, assign(self.columns)))

    @property
    def feature_names(self) -> list[str]:
        return [c.name for c in self.features]

    @property
    def columns(self) -> tuple[Column, ...]:
        return self.features + self.attributes

    @functools.cached_property  # read per model and batch; a spec never changes
    def layout(self) -> tuple:
        """What an inference of this model looks like: models with the same
        layout are validated and stored together (sensitivity plays no part)."""
        return (self.prediction_type, tuple((c.name, c.type, c.nullable) for c in self.features),
                tuple((c.name, c.type) for c in self.attributes))

    @functools.cached_property
    def layout_id(self) -> int:
        """A small number per distinct layout in this process (equal layouts, equal numbers):
        what the stream groups models by, per model and batch, without hashing the layout."""
        return _LAYOUT_IDS.setdefault(self.layout, len(_LAYOUT_IDS))

    def to_json(self) -> dict:
        def col(c: Column) -> dict:
            d = {"name": c.name, "type": c.type}
            if c.sensitive:
                d["sensitive"] = True
            if c.nullable:
                d["nullable"] = True
            return d

        return {
            "task": self.task,
            "features": [col(c) for c in self.features],
            "attributes": [col(c) for c in self.attributes],
            "positive_threshold": self.positive_threshold,
            "prediction_type": self.prediction_type,
        }

    @classmethod
    def from_json(cls, model_id: str, doc: Any, stored: bool = False) -> "ModelSpec":
        """Validate a schema document; every problem names the key at fault.

        A key the schema does not know is refused, with the nearest known one
        (a misspelt `positive_treshold` would otherwise silently leave the
        default threshold in place). `stored`: a schema this package wrote
        earlier (the registry's copy), whose keys of older releases are let go."""
        check_model_id(model_id)
        if not isinstance(doc, dict):
            raise SpecError("schema: the schema must be a JSON object")
        if not stored:
            _refuse_unknown(doc, SCHEMA_KEYS, "schema", "a schema")
        task = doc.get("task")
        if task not in TASKS:
            raise SpecError(f"schema.task: must be one of {', '.join(TASKS)}, got {task!r}")
        features = _columns(doc.get("features"), "features", required=True, stored=stored)
        attributes = _columns(doc.get("attributes", []), "attributes", required=False, stored=stored)
        seen: set[str] = set()
        for c in features + attributes:
            if c.name in seen:
                raise SpecError(f"schema: column name {c.name!r} is used twice")
            seen.add(c.name)
        threshold = doc.get("positive_threshold", 0.5)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise SpecError(f"schema.positive_threshold: must be a number in [0, 1], got {threshold!r}")
        default_pred = "categorical" if task == "multiclass_classification" else "numeric"
        prediction_type = doc.get("prediction_type", default_pred)
        if prediction_type not in VALUE_TYPES:
            raise SpecError(
                f"schema.prediction_type: must be one of {', '.join(VALUE_TYPES)}, got {prediction_type!r}"
            )
        return cls(
            model_id=model_id,
            task=task,
            features=tuple(features),
            attributes=tuple(attributes),
            positive_threshold=float(threshold),
            prediction_type=prediction_type,
        )


SCHEMA_KEYS = ("task", "features", "attributes", "positive_threshold", "prediction_type")
COLUMN_KEYS = ("name", "type", "sensitive", "nullable")


def _refuse_unknown(doc: dict, known: tuple[str, ...], where: str, what: str) -> None:
    import difflib

    for key in doc:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise SpecError(f"{where}.{key}: unknown key; {hint}{what} takes {', '.join(known)}")


def _columns(value: Any, key: str, required: bool, stored: bool = False) -> list[Column]:
    if not isinstance(value, list) or (required and not value):
        raise SpecError(f"schema.{key}: must be a {'non-empty ' if required else ''}list of columns")
    out = []
    for i, item in enumerate(value):
        where = f"schema.{key}[{i}]"
        if not isinstance(item, dict):
            raise SpecError(f"{where}: must be an object with 'name' and 'type'")
        if not stored:
            _refuse_unknown(item, COLUMN_KEYS, where, "a column")
        name = item.get("name")
        if not isinstance(name, str) or not _COLUMN_NAME.match(name):
            raise SpecError(f"{where}.name: {name!r} must match {COLUMN_NAME_RULE}")
        owner = _reserved_by(name)
        if owner:
            raise SpecError(f"{where}.name: {name!r} is reserved for {owner}; rename it")
        ctype = item.get("type")
        if ctype not in VALUE_TYPES:
            raise SpecError(f"{where}.type: must be one of {', '.join(VALUE_TYPES)}, got {ctype!r}")
        sensitive = item.get("sensitive", False)
        if not isinstance(sensitive, bool):
            raise SpecError(f"{where}.sensitive: must be true or false")
        nullable = item.get("nullable", False)
        if not isinstance(nullable, bool):
            raise SpecError(f"{where}.nullable: must be true or false")
        if nullable and key != "features":
            raise SpecError(f"{where}.nullable: attributes may always be null; 'nullable' is for features")
        out.append(Column(name, ctype, sensitive, nullable))
    return out

