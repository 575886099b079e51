"""Fairness, a window report: per sensitive attribute and group, how the decisions fall.

For a binary classifier that sends its score, over the rows of a window: per
sensitive attribute and group (each value; NULL rows are a group of their own,
left out of the gaps), the selection rate, the true positive rate and the false
positive rate of
- the raw decision: `score >= positive_threshold`;
- `bias_mitigated_prediction` (rows bias mitigation decided: not NULL);
the rates over labelled rows for TPR and FPR (label 1 positive, 0 negative),
and, per constraint, the gap (the largest difference between groups) before
and after mitigation: demographic parity (selection rates), equal opportunity
(TPRs), equalized odds (the larger of the TPR and FPR gaps). Counted in
ClickHouse SQL; tests/test_fairness.py checks them against NumPy on the same rows.
"""

from __future__ import annotations

from enricher import metrics
from enricher.errors import Conflict
from enricher.models.spec import ModelSpec
from enricher.store.clickhouse import quote

MAX_GROUPS = 50
CONSTRAINTS = ("demographic_parity", "equal_opportunity", "equalized_odds")
DECISIONS = ("raw", "mitigated")


def _sql(database: str, spec: ModelSpec, attribute: str, start: float, end: float) -> str:
    t = repr(float(spec.positive_threshold))
    d, m = f"(prediction >= {t})", "bias_mitigated_prediction"
    return (f"SELECT ifNull(toString({quote(attribute)}), 'NULL') AS grp, count(), "
            f"countIf(label = 1), countIf(label = 0), countIf({d}), countIf({d} AND label = 1), "
            f"countIf({d} AND label = 0), countIf({m} IS NOT NULL), countIf({m} = 1), "
            f"countIf({m} IS NOT NULL AND label = 1), countIf({m} = 1 AND label = 1), "
            f"countIf({m} IS NOT NULL AND label = 0), countIf({m} = 1 AND label = 0) "
            f"FROM {quote(database)}.{quote(spec.model_id)} "
            f"WHERE timestamp >= toDateTime64({float(start)!r}, 3, 'UTC') "
            f"AND timestamp < toDateTime64({float(end)!r}, 3, 'UTC') "
            f"GROUP BY grp ORDER BY count() DESC, grp LIMIT {MAX_GROUPS + 1}")


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _group(row) -> dict:
    grp, n, pos, neg, sel, tp, fp, m_n, m_sel, m_pos, m_tp, m_neg, m_fp = row
    return {"group": grp, "rows": n, "labelled": pos + neg,
            "raw": {"selection_rate": _ratio(sel, n), "tpr": _ratio(tp, pos), "fpr": _ratio(fp, neg)},
            "mitigated": {"rows": m_n, "selection_rate": _ratio(m_sel, m_n), "tpr": _ratio(m_tp, m_pos),
                          "fpr": _ratio(m_fp, m_neg)}}


def gaps(groups: list[dict], decision: str) -> dict[str, float | None]:
    def spread(rate):
        values = [g[decision][rate] for g in groups if g["group"] != "NULL" and g[decision][rate] is not None]
        return max(values) - min(values) if len(values) > 1 else None
    tpr, fpr = spread("tpr"), spread("fpr")
    return {"demographic_parity": spread("selection_rate"), "equal_opportunity": tpr,
            "equalized_odds": None if tpr is None or fpr is None else max(tpr, fpr)}


def measure(store, spec: ModelSpec, start: float, end: float, options: dict, limit: int | None = None) -> dict:
    """The report over [start, end) (`store`: reports.ReportStore)."""
    attributes = [c.name for c in spec.columns if c.sensitive]
    if spec.task != "binary_classification" or spec.prediction_type != "numeric" or not attributes:
        raise Conflict(f"model {spec.model_id}: the fairness report needs a binary classifier that sends its score "
                       "and a sensitive attribute", "model_id")
    client = store.tables().client
    out = []
    for attribute in attributes:
        rows = client.query(_sql(store.settings.clickhouse_database, spec, attribute, start, end)).result_rows
        groups = [_group(r) for r in rows[:MAX_GROUPS]]
        out.append({"attribute": attribute, "groups": groups, "groups_not_shown": max(0, len(rows) - MAX_GROUPS),
                    "gaps": {d: gaps(groups, d) for d in DECISIONS}})
    return {"positive_threshold": spec.positive_threshold, "attributes": out}


def text(report: dict) -> list:
    out = [f"{report['model_id']}: fairness from {report['start']} to {report['end']} (raw decision: score >= "
           f"{report['positive_threshold']}; mitigated: bias_mitigated_prediction)"]
    for a in report["attributes"]:
        out.append(f"\n{a['attribute']}:")
        out.append((["group", "rows", "labelled", "selection_rate", "tpr", "fpr", "mitigated_rows",
                     "mitigated_selection_rate", "mitigated_tpr", "mitigated_fpr"],
                    [[g["group"], g["rows"], g["labelled"], g["raw"]["selection_rate"], g["raw"]["tpr"],
                      g["raw"]["fpr"], g["mitigated"]["rows"], g["mitigated"]["selection_rate"],
                      g["mitigated"]["tpr"], g["mitigated"]["fpr"]] for g in a["groups"]]))
        out.append((["constraint", "gap_raw", "gap_mitigated"],
                    [[c, a["gaps"]["raw"][c], a["gaps"]["mitigated"][c]] for c in CONSTRAINTS]))
    return out


def export(model_id: str, report: dict) -> set:
    """enricher_fairness_gap{model, attribute, constraint, decision}: at most attributes x 3 x 2 per model."""
    keys = set()
    for a in report["attributes"]:
        for decision in DECISIONS:
            for constraint, value in a["gaps"][decision].items():
                key = (model_id, a["attribute"], constraint, decision)
                keys.add(key)
                if value is None:
                    unexport(key)
                else:
                    metrics.FAIRNESS_GAP.labels(*key).set(value)
    return keys


def unexport(key: tuple) -> None:
    try:
        metrics.FAIRNESS_GAP.remove(*key)
    except KeyError:
        pass
