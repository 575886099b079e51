"""Model performance, a window report: how good were the predictions whose label has arrived.

Over the rows of a window (by inference time) of the model's view:
- `rows`, `labelled` (the label has arrived: with the inference or later, by
  the label sweep) and `label_coverage` (labelled / rows);
- binary classification with a score (`prediction_type: numeric`): the decision
  is `score >= positive_threshold`, the label 1 is the positive class and 0 the
  negative one (a label of any other value is counted in `unusable_labels` and
  left out): accuracy, precision, recall, F1 and ROC AUC (on the scores, ties
  averaged: ClickHouse's arrayAUC);
- class labels (multiclass, or binary with `prediction_type: categorical`):
  accuracy and macro F1 (the mean over every class seen as label or prediction
  of 2tp / (2tp + fp + fn));
- regression: MAE, RMSE and R^2.
Everything is counted and summed in ClickHouse SQL; a figure the rows cannot
give (no labelled row, no predicted positive for precision, one class only for
ROC AUC, a constant label for R^2) is null, where scikit-learn would warn and
give 0 (its `zero_division=np.nan` gives the same as here). tests/test_performance.py
checks every figure against scikit-learn on the same rows (to 1e-9).

`--by COLUMN` (any feature or attribute) gives the same per segment: each value
of a categorical column (the MAX_SEGMENTS largest), or ten bins of equal row
count of a numeric one (the window's own deciles; each segment [low, high),
null for an open end).
"""

from __future__ import annotations

import math

from enricher import metrics
from enricher.errors import InvalidArgument
from enricher.models.spec import ModelSpec
from enricher.store.clickhouse import quote

MAX_SEGMENTS = 50
BINS = 10
SCORE_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc")
CLASS_METRICS = ("accuracy", "macro_f1")
REGRESSION_METRICS = ("mae", "rmse", "r2")


def kind(spec: ModelSpec) -> str:
    if spec.task == "regression":
        return "regression"
    return "score" if spec.prediction_type == "numeric" else "classes"


def metric_names(spec: ModelSpec) -> tuple[str, ...]:
    return {"score": SCORE_METRICS, "classes": CLASS_METRICS, "regression": REGRESSION_METRICS}[kind(spec)]


def _window(database: str, spec: ModelSpec, start: float, end: float) -> str:
    return (f"FROM {quote(database)}.{quote(spec.model_id)} "
            f"WHERE timestamp >= toDateTime64({float(start)!r}, 3, 'UTC') "
            f"AND timestamp < toDateTime64({float(end)!r}, 3, 'UTC')")


def _segment(client, database: str, spec: ModelSpec, by: str | None, start: float, end: float):
    """(SQL expression of a row's segment, names of the segments by their key)."""
    if by is None:
        return "''", None
    column = next((c for c in spec.columns if c.name == by), None)
    if column is None:
        raise InvalidArgument(f"model {spec.model_id} has no feature or attribute {by!r}; it has "
                              f"{', '.join(c.name for c in spec.columns)}", "by")
    col = quote(by)
    if not column.numeric:
        return f"ifNull(toString({col}), 'NULL')", None
    levels = ", ".join(repr(k / BINS) for k in range(1, BINS))
    edges = client.query(f"SELECT arraySort(arrayDistinct(quantilesExact({levels})({col}))) "
                         f"{_window(database, spec, start, end)} AND {col} IS NOT NULL").result_rows[0][0]
    edges = [e for e in edges if e is not None and math.isfinite(e)]
    bounds = [-math.inf] + edges + [math.inf]
    names = {str(i): {"segment": f"[{_num(bounds[i])}, {_num(bounds[i + 1])})",
                      "low": _finite(bounds[i]), "high": _finite(bounds[i + 1])} for i in range(len(bounds) - 1)}
    names["NULL"] = {"segment": "NULL", "low": None, "high": None}
    array = "[" + ", ".join(repr(float(e)) for e in edges) + "]"
    return (f"if({col} IS NULL, 'NULL', toString(arrayCount(e -> {col} >= e, CAST({array} AS Array(Float64)))))",
            names)


def _num(x: float) -> str:
    return "-inf" if x == -math.inf else "inf" if x == math.inf else f"{x:.6g}"


def _score_sql(spec: ModelSpec, where: str, segment: str) -> str:
    t = float(spec.positive_threshold)
    usable = "label IN (0, 1)"
    return (f"SELECT {segment} AS segment, count() AS rows, countIf(label IS NOT NULL) AS labelled, "
            f"countIf({usable}) AS usable, "
            f"countIf(label = 1 AND prediction >= {t!r}) AS tp, countIf(label = 0 AND prediction >= {t!r}) AS fp, "
            f"countIf(label = 1 AND prediction < {t!r}) AS fn, countIf(label = 0 AND prediction < {t!r}) AS tn, "
            f"arrayAUC(groupArrayIf(prediction, {usable}), groupArrayIf(toUInt8(label = 1), {usable})) AS auc "
            f"{where} GROUP BY segment ORDER BY rows DESC, segment LIMIT {MAX_SEGMENTS + 1}")


def _classes_sql(where: str, segment: str) -> str:
    # Each labelled row counts for the class it predicted and the class it should have
    # (once if they agree): tp where both are the class, fp where only the prediction
    # is, fn where only the label is.
    per_class = (f"SELECT segment, c, countIf(prediction = c AND label = c) AS tp, "
                 f"countIf(prediction = c AND label != c) AS fp, countIf(label = c AND prediction != c) AS fn "
                 f"FROM (SELECT {segment} AS segment, prediction, label, "
                 f"arrayJoin(arrayDistinct([assumeNotNull(prediction), assumeNotNull(label)])) AS c "
                 f"{where} AND label IS NOT NULL AND prediction IS NOT NULL) "
                 f"GROUP BY segment, c")
    return (f"SELECT totals.segment, totals.rows, totals.labelled, totals.correct, f1.macro_f1 FROM "
            f"(SELECT {segment} AS segment, count() AS rows, countIf(label IS NOT NULL) AS labelled, "
            f"countIf(label IS NOT NULL AND prediction = label) AS correct {where} GROUP BY segment) AS totals "
            f"LEFT JOIN (SELECT segment, avg(2 * tp / (2 * tp + fp + fn)) AS macro_f1 FROM ({per_class}) "
            f"GROUP BY segment) AS f1 ON totals.segment = f1.segment "
            f"ORDER BY totals.rows DESC, totals.segment LIMIT {MAX_SEGMENTS + 1} "
            f"SETTINGS join_use_nulls = 1")


def _regression_sql(where: str, segment: str) -> str:
    known = "label IS NOT NULL AND prediction IS NOT NULL"
    return (f"SELECT {segment} AS segment, count() AS rows, countIf(label IS NOT NULL) AS labelled, "
            f"countIf({known}) AS usable, sumIf(abs(prediction - label), {known}) AS abs_error, "
            f"sumIf((prediction - label) * (prediction - label), {known}) AS squared_error, "
            f"varPopIf(label, {known}) AS label_variance "
            f"{where} GROUP BY segment ORDER BY rows DESC, segment LIMIT {MAX_SEGMENTS + 1}")


def _ratio(a, b) -> float | None:
    return a / b if b else None


def _finite(x) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _figures(kind_: str, row) -> dict:
    """A segment's (or the whole window's) figures from its SQL row."""
    if kind_ == "score":
        _, rows, labelled, usable, tp, fp, fn, tn, auc = row
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        figures = {"accuracy": _ratio(tp + tn, usable), "precision": precision, "recall": recall,
                   "f1": _ratio(2 * tp, 2 * tp + fp + fn), "roc_auc": _finite(auc) if tp + fn and fp + tn else None}
        extra = {"unusable_labels": labelled - usable}
    elif kind_ == "classes":
        _, rows, labelled, correct, macro_f1 = row
        figures = {"accuracy": _ratio(correct, labelled), "macro_f1": _finite(macro_f1) if labelled else None}
        extra = {}
    else:
        _, rows, labelled, usable, abs_error, squared_error, variance = row
        ss_tot = variance * usable if usable else 0.0
        figures = {"mae": _ratio(abs_error, usable), "rmse": math.sqrt(squared_error / usable) if usable else None,
                   "r2": 1.0 - squared_error / ss_tot if usable and ss_tot > 0 else None}
        extra = {}
    return {"rows": rows, "labelled": labelled, "label_coverage": _ratio(labelled, rows), **extra,
            "metrics": figures}


def measure(store, spec: ModelSpec, start: float, end: float, options: dict, limit: int | None = None) -> dict:
    """The report over [start, end) (`store`: reports.ReportStore); options: `by`."""
    database = store.settings.clickhouse_database
    client = store.tables().client
    where = _window(database, spec, start, end)
    k = kind(spec)
    build = {"score": lambda seg: _score_sql(spec, where, seg), "classes": lambda seg: _classes_sql(where, seg),
             "regression": lambda seg: _regression_sql(where, seg)}[k]
    rows = client.query(build("''")).result_rows
    whole = _figures(k, rows[0]) if rows else _figures(k, _empty(k))
    report = {"task": spec.task, "metric_names": list(metric_names(spec)), **whole}
    if options.get("by"):
        segment, names = _segment(client, database, spec, options["by"], start, end)
        segments = client.query(build(segment)).result_rows
        report["by"] = options["by"]
        shown = min(MAX_SEGMENTS, limit or MAX_SEGMENTS)
        report["segments"] = [{**(names[r[0]] if names else {"segment": r[0]}), **_figures(k, r)}
                              for r in segments[:shown]]
        report["segments_not_shown"] = max(0, len(segments) - shown)
    return report


def _empty(kind_: str) -> tuple:
    return {"score": ("", 0, 0, 0, 0, 0, 0, 0, None), "classes": ("", 0, 0, 0, None),
            "regression": ("", 0, 0, 0, 0.0, 0.0, 0.0)}[kind_]


def text(report: dict) -> list:
    """The report as the CLI prints it: lines, and tables as (columns, rows)."""
    names = report["metric_names"]
    out = [f"{report['model_id']}: performance from {report['start']} to {report['end']} ({report['task']}), "
           f"on the rows whose label has arrived"]
    columns = ["rows", "labelled", "label_coverage", *names]
    whole = [[report[c] for c in columns[:3]] + [report["metrics"][m] for m in names]]
    out.append((columns, whole))
    if "segments" in report:
        out.append(f"\nby {report['by']}:")
        out.append((["segment", *columns], [[s["segment"]] + [s[c] for c in columns[:3]]
                                           + [s["metrics"][m] for m in names] for s in report["segments"]]))
        if report["segments_not_shown"]:
            out.append(f"({report['segments_not_shown']} smaller segments not shown)")
    if report.get("unusable_labels"):
        out.append(f"{report['unusable_labels']:,} labelled rows left out: a binary label must be 0 or 1")
    if report["labelled"] == 0:
        out.append("no labelled rows in this window: send labels with the inferences, or later as label "
                   "updates ({\"model_id\", \"inference_id\", \"label\"})")
    return out


def export(model_id: str, report: dict) -> set:
    """The whole window's figures as gauges: enricher_performance{model, metric} (the task's
    metrics, label_coverage and labelled); a figure the rows cannot give has no series."""
    keys = set()
    figures = {**report["metrics"], "label_coverage": report["label_coverage"], "labelled": report["labelled"]}
    for metric, value in figures.items():
        keys.add((model_id, metric))
        if value is None:
            _remove(model_id, metric)
        else:
            metrics.PERFORMANCE.labels(model_id, metric).set(value)
    return keys


def unexport(key: tuple) -> None:
    _remove(*key)


def _remove(model_id: str, metric: str) -> None:
    try:
        metrics.PERFORMANCE.remove(model_id, metric)
    except KeyError:
        pass
