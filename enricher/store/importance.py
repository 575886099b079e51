"""Global importance, a window report: mean absolute attribution per feature over a window.

One SQL query over the model's view (its explained rows only: `explanation_output`
not NULL), most important first; `unit` says what the attributions are measured in
(the serving artifact's). A model with a categorical prediction (multiclass) also
gets `classes`: the same per predicted class, since each row's attributions explain
the class predicted on it. `enricher explain MODEL --window 1d [--plot FILE.png]`,
`GET /models/{id}/importance?window=1d`.
"""

from __future__ import annotations

import numpy as np

from enricher.errors import UserError
from enricher.models.explainability import NAME, OUTPUT, PREFIX, attribution_unit
from enricher.models.spec import ModelSpec
from enricher.store.clickhouse import quote

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


def measure(store, spec: ModelSpec, start: float, end: float, options: dict, limit: int | None = None) -> dict:
    """The report over [start, end) (`store`: reports.ReportStore, this thread's connection);
    `limit`: the most important features only."""
    database = store.settings.clickhouse_database
    client = store.tables().client
    count, *values = client.query(importance_sql(database, spec, start, end)).result_rows[0]
    artifacts = store.settings.artifacts()
    current = artifacts.current_version(spec.model_id, NAME)
    quality = next((m.parameters.get("quality", {}) for m in artifacts.manifests(spec.model_id, NAME)
                    if m.version == current), {})
    report = {"rows": count, "unit": attribution_unit(spec, quality), "features": _features(spec, values)[:limit]}
    if spec.prediction_type != "numeric":
        per_class = client.query(importance_sql(database, spec, start, end, True)).result_rows
        report["classes"] = [{"class": r[0], "rows": r[1], "features": _features(spec, r[2:])[:limit]}
                             for r in per_class[:MAX_CLASSES]]
        report["classes_not_shown"] = max(0, len(per_class) - MAX_CLASSES)
    return report


def text(report: dict) -> list:
    """The report as the CLI prints it: lines, and tables as (columns, rows)."""
    columns = ["feature", "mean_abs", "mean"]
    out = [f"{report['model_id']}: global importance, {report['rows']:,} explained rows from {report['start']} "
           f"to {report['end']} (mean |attribution|; mean: its sign on average; in {report['unit']})",
           (columns, [[f[c] for c in columns] for f in report["features"]])]
    for c in report.get("classes", []):  # a multiclass model: each row explains its predicted class
        out += [f"\npredicted class {c['class']}: {c['rows']:,} rows",
                (columns, [[f[k] for k in columns] for f in c["features"]])]
    if report.get("classes_not_shown"):
        out.append(f"\n({report['classes_not_shown']} less frequent classes not shown)")
    if report["rows"] == 0:
        out.append("no explained rows in this window: is explainability on (enricher enrichments show "
                   f"{report['model_id']}), and did inferences arrive?")
    return out


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
