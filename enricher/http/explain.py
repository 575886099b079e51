"""Explanations beyond the stream: one stored inference's and a what-if's.

- `OnDemand.stored(model, inference_id)`: the attributions stored on that
  inference's row; for a row the sample rate skipped (or written before
  explanations were on), computed now from the row's own features by the
  artifact serving the model (`source` says which, `version` which artifact);
- `OnDemand.what_if(model, body)`: the attributions for any features, validated
  exactly as an inference is (a bad value is refused with its reason).

Global importance over a window is a window report (store/importance.py).

The API serves both (GET /models/{id}/inferences/{inference_id}/explanation,
POST /models/{id}/what_if); each reads the model's view or the served artifact,
nothing else.
"""

from __future__ import annotations

import json
import threading
import time

import pyarrow as pa

from enricher.config import Settings
from enricher.errors import Conflict, NotFound, RequestError
from enricher.models.enrichment import InferenceBatch
from enricher.models.explainability import BASE, NAME, OUTPUT, PREFIX
from enricher.models.registry import ModelRegistry, UnknownModel
from enricher.models.spec import ModelSpec, SpecError, check_model_id
from enricher.store.clickhouse import connect, quote
from enricher.stream.contract import parse_batch

WHAT_IF_FIELDS = {"features", "attributes", "prediction"}
MAX_WHAT_IF_BYTES = 1 << 20


class OnDemand:
    """Explanations for the API: from the model's view, or computed by the served artifact."""

    def __init__(self, settings: Settings, registry: ModelRegistry, serving):
        self.settings = settings
        self.registry = registry
        self.serving = serving
        self._local = threading.local()

    def _spec(self, model_id: str) -> ModelSpec:
        try:
            check_model_id(model_id)
            return self.registry.get(model_id)
        except SpecError as exc:
            raise RequestError(str(exc), "model_id") from None
        except UnknownModel as exc:
            raise NotFound(str(exc), "model_id") from None

    def _artifact(self, model_id: str):
        active = self.serving.active(model_id).get(NAME)
        if active is None:
            raise Conflict(f"{NAME} is not serving model {model_id!r}: turn it on (PATCH "
                               f"/models/{model_id}/enrichments {{\"{NAME}\": {{\"enabled\": true}}}}) and wait "
                               "for its status to be ready", NAME)
        return active

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = connect(self.settings)
        return client

    def forget_connection(self) -> None:
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            client.close()

    def stored(self, model_id: str, inference_id: str) -> dict:
        spec = self._spec(model_id)
        if not isinstance(inference_id, str) or not inference_id or len(inference_id) > 1024:
            raise RequestError("inference_id: 1 to 1024 characters", "inference_id")
        view = f"{quote(self.settings.clickhouse_database)}.{quote(model_id)}"
        columns = [c.name for c in spec.columns] + ["prediction", "label", "timestamp",
                                                    f"{NAME}_version", BASE, OUTPUT] + \
            [f"{PREFIX}{f}" for f in spec.feature_names]
        sql = (f"SELECT {', '.join(quote(c) for c in columns)} FROM {view} "
               "WHERE inference_id = {id:String} ORDER BY _ingested_at DESC LIMIT 1")
        try:
            result = self._client().query(sql, parameters={"id": inference_id})
        except Exception:
            self.forget_connection()
            raise
        if not result.result_rows:
            raise NotFound(f"model {model_id!r} has no inference {inference_id!r}", "inference_id")
        row = dict(zip(columns, result.result_rows[0]))
        if row[OUTPUT] is not None:
            return _answer(spec, inference_id, "stored", row[f"{NAME}_version"], row[BASE], row[OUTPUT],
                           [row[f"{PREFIX}{f}"] for f in spec.feature_names])
        active = self._artifact(model_id)
        value_type = pa.float64() if spec.prediction_type == "numeric" else pa.string()
        batch = InferenceBatch(
            spec, {c.name: pa.array([row[c.name]], pa.float64() if c.numeric else pa.string()) for c in spec.columns},
            1, prediction=pa.array([row["prediction"]], value_type), label=pa.array([row["label"]], value_type),
            inference_id=pa.array([inference_id]), timestamp=pa.array([row["timestamp"]], pa.timestamp("ms", "UTC")))
        return _computed(spec, inference_id, "computed", active, batch)

    def what_if(self, model_id: str, body) -> dict:
        spec = self._spec(model_id)
        if not isinstance(body, dict):
            raise RequestError('body must be a JSON object {"features": {...}}', "")
        unknown = sorted(set(body) - WHAT_IF_FIELDS)
        if unknown:
            raise RequestError(f"unknown field(s) {unknown}; a what-if takes features, and optionally attributes "
                               "and prediction", unknown[0])
        if "features" not in body:
            raise RequestError("features: missing (an object with a value for every feature)", "features")
        placeholder = "prediction" not in body or body["prediction"] is None
        message = {"model_id": model_id, "inference_id": "what-if", "timestamp": int(time.time() * 1000),
                   "features": body["features"],
                   "prediction": (0.0 if spec.prediction_type == "numeric" else "?") if placeholder
                   else body["prediction"]}
        if body.get("attributes") is not None:
            message["attributes"] = body["attributes"]
        try:  # as a producer would send it: the stream's own parser then judges every value
            raw = json.dumps(message).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise RequestError(f"body: cannot be read as an inference ({exc})", "") from None
        active = self._artifact(model_id)
        parsed = parse_batch([raw], [0], [0], {model_id: spec}.get, MAX_WHAT_IF_BYTES)
        if parsed.dead:
            dead = parsed.dead[0]
            text = f"{dead.reason}: {dead.detail}"
            field = "prediction" if "prediction" in text else "features"
            raise RequestError(text, field)
        rows = parsed.models[model_id]
        batch = rows.batch()
        if placeholder:  # no class given: the surrogate's own choice is explained
            batch.prediction = pa.nulls(1, batch.prediction.type)
        return _computed(spec, None, "what_if", active, batch)


def _computed(spec: ModelSpec, inference_id, source: str, active, batch: InferenceBatch) -> dict:
    out = active.fitted.explain(batch)
    return _answer(spec, inference_id, source, active.version, out[BASE][0].as_py(), out[OUTPUT][0].as_py(),
                   [out[f"{PREFIX}{f}"][0].as_py() for f in spec.feature_names])


def _answer(spec: ModelSpec, inference_id, source: str, version, base, output, attributions) -> dict:
    doc = {"model_id": spec.model_id, "source": source, "version": version, "base_value": base, "output": output,
           "attributions": dict(zip(spec.feature_names, attributions))}
    if inference_id is not None:
        doc = {"inference_id": inference_id, **doc}
    return doc
