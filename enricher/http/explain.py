"""Explanations beyond the stream: one stored inference's, a what-if's, and global importance.

- `OnDemand.stored(model, inference_id)`: the attributions stored on that
  inference's row; for a row the sample rate skipped (or written before
  explanations were on), computed now from the row's own features by the
  artifact serving the model (`source` says which, `version` which artifact);
- `OnDemand.what_if(model, body)`: the attributions for any features, validated
  exactly as an inference is (a bad value is refused with its reason);
- `importance(...)`: mean absolute attribution per feature over a time window,
  one SQL query over the model's view (`enricher explain MODEL --window 1d`).

The API serves the first two (GET /models/{id}/inferences/{inference_id}/explanation,
POST /models/{id}/what_if); each reads the model's view or the served artifact,
nothing else.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pyarrow as pa

from enricher.config import Settings
from enricher.control.plane import Conflict, NotFound, RequestError
from enricher.errors import UserError
from enricher.models.enrichment import InferenceBatch
from enricher.models.explainability import BASE, NAME, OUTPUT, PREFIX
from enricher.models.registry import ModelRegistry, UnknownModel
from enricher.models.spec import ModelSpec, SpecError, check_model_id
from enricher.store.clickhouse import connect, quote
from enricher.stream.contract import parse_batch
from enricher.windows import parse_end, parse_window

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


MAX_CLASSES = 12  # per-class panels: the classes with the most explained rows, at most this many


def importance_sql(database: str, spec: ModelSpec, start: float, end: float, by_class: bool = False) -> str:
    """Mean absolute (and signed) attribution per feature over [start, end), explained rows
    only; `by_class`: per predicted class (the class each row's attributions explain),
    most rows first."""
    parts = []
    for f in spec.feature_names:
        col = quote(f"{PREFIX}{f}")
        parts += [f"avg(abs({col}))", f"avg({col})"]
    where = (f"FROM {quote(database)}.{quote(spec.model_id)} "
             f"WHERE timestamp >= toDateTime64({float(start)!r}, 3, 'UTC') "
             f"AND timestamp < toDateTime64({float(end)!r}, 3, 'UTC') AND {quote(OUTPUT)} IS NOT NULL")
    if by_class:
        return (f"SELECT toString(prediction) AS class, count() AS n, {', '.join(parts)} {where} "
                f"GROUP BY class ORDER BY n DESC, class LIMIT {MAX_CLASSES + 1}")
    return f"SELECT count(), {', '.join(parts)} {where}"


def _features(spec: ModelSpec, values) -> list[dict]:
    features = [{"feature": f, "mean_abs": values[2 * i], "mean": values[2 * i + 1]}
                for i, f in enumerate(spec.feature_names)]
    features.sort(key=lambda r: -(r["mean_abs"] if r["mean_abs"] is not None and np.isfinite(r["mean_abs"]) else -1))
    return features


def importance(settings: Settings, model_id: str, window: str, end: str | None = None) -> dict:
    """Global importance over a window, most important first (through `query`: the running
    worker that holds the embedded store, or the store directly). `unit`: what the
    attributions are measured in (the serving artifact's). A model with a categorical
    prediction (multiclass) also gets `classes`: the same per predicted class, since each
    row's attributions explain the class predicted on it."""
    from datetime import datetime, timezone

    from enricher.models.explainability import attribution_unit
    from enricher.store.query import query

    spec = ModelRegistry(settings.registry_dir).get(check_model_id(model_id))
    seconds = parse_window(window)
    stop = parse_end(end) or time.time()
    start = stop - seconds
    _, rows = query(settings, importance_sql(settings.clickhouse_database, spec, start, stop))
    count, values = rows[0][0], rows[0][1:]

    def iso(t):
        return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")

    store = settings.artifacts()
    current = store.current_version(model_id, NAME)
    quality = next((m.parameters.get("quality", {}) for m in store.manifests(model_id, NAME)
                    if m.version == current), {})
    report = {"model_id": model_id, "start": iso(start), "end": iso(stop), "rows": count,
              "unit": attribution_unit(spec, quality), "features": _features(spec, values)}
    if spec.prediction_type != "numeric":
        _, per_class = query(settings, importance_sql(settings.clickhouse_database, spec, start, stop, True))
        report["classes"] = [{"class": r[0], "rows": r[1], "features": _features(spec, r[2:])}
                             for r in per_class[:MAX_CLASSES]]
        report["classes_not_shown"] = max(0, len(per_class) - MAX_CLASSES)
    return report


def plot(report: dict, path: str) -> None:
    """Horizontal bars of mean |attribution| per feature, as PNG, the unit on the axis;
    for a multiclass model one panel per predicted class (the most frequent first)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'inference-enricher[plot]' (or matplotlib)") from None
    panels = [(f"class {c['class']}: {c['rows']:,} rows", c["features"]) for c in report.get("classes", [])] \
        or [(f"{report['rows']:,} rows", report["features"])]
    columns = min(3, len(panels))
    grid_rows = -(-len(panels) // columns)
    height = 0.3 * max(3, len(report["features"])) + 1.0
    fig, axes = plt.subplots(grid_rows, columns, figsize=(6.5 * columns, height * grid_rows + 1.0),
                             squeeze=False, sharex=len(panels) > 1)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, features) in zip(axes.flat, panels):
        shown = [f for f in features if f["mean_abs"] is not None][::-1]
        ax.barh([f["feature"] for f in shown], [f["mean_abs"] for f in shown], color="#3b75af")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"mean |attribution|, in {report['unit']}", fontsize=8)
    more = f" ({report['classes_not_shown']} less frequent classes not shown)" if report.get("classes_not_shown") else ""
    fig.suptitle(f"{report['model_id']}: global importance, {report['rows']:,} explained rows{more}\n"
                 f"{report['start']} to {report['end']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
