"""Hotspots, a window report: the serving hotspots and how the model does in each lately.

The hotspots themselves come from the serving `hotspots` artifact
(models/hotspots.py: rules, size and accuracy on the training rows, when
found); the window adds, per hotspot, the rows the worker tagged with it
(`hotspot_id`) and the accuracy of those whose label has arrived, counted in
ClickHouse SQL; and what the version was trained on (reference rows, and the
labelled stream rows of which window). `enricher hotspots MODEL`,
`GET /models/{id}/hotspots`.
"""

from __future__ import annotations

from enricher.errors import Conflict
from enricher.models.artifact import ArtifactError
from enricher.models.hotspots import NAME, Hotspots
from enricher.models.spec import ModelSpec
from enricher.store.clickhouse import quote


def _correct_sql(spec: ModelSpec) -> str:
    if spec.prediction_type == "numeric":
        return f"((prediction >= {float(spec.positive_threshold)!r}) = (label = 1))"
    return "(prediction = label)"


def measure(store, spec: ModelSpec, start: float, end: float, options: dict, limit: int | None = None) -> dict:
    """The report over [start, end) (`store`: reports.ReportStore)."""
    artifacts = store.settings.artifacts()
    try:
        verified = artifacts.load(spec.model_id, NAME)
    except ArtifactError as exc:
        raise Conflict(f"{exc} (turn {NAME} on, and wait for its status to be ready)", NAME) from None
    artifact = Hotspots().load(spec, verified.manifest, verified.blobs)
    sql = (f"SELECT hotspot_id, count(), countIf(label IS NOT NULL), countIf(label IS NOT NULL AND "
           f"{_correct_sql(spec)}) FROM {quote(store.settings.clickhouse_database)}.{quote(spec.model_id)} "
           f"WHERE timestamp >= toDateTime64({float(start)!r}, 3, 'UTC') "
           f"AND timestamp < toDateTime64({float(end)!r}, 3, 'UTC') AND hotspots_version = {verified.manifest.version} "
           f"GROUP BY hotspot_id")
    window = {r[0]: r[1:] for r in store.tables().client.query(sql).result_rows}
    scored = sum(v[0] for v in window.values())  # NULL hotspot_id: in no hotspot
    out = []
    for h in artifact.hotspots[:limit]:
        rows, labelled, right = window.get(h["id"], (0, 0, 0))
        out.append({"id": h["id"], "rules": h["rules"], "training_rows": h["rows"],
                    "training_accuracy": h["accuracy"], "found_at": h["found_at"], "rows": rows,
                    "labelled": labelled, "accuracy": right / labelled if labelled else None})
    trained_on = verified.manifest.parameters.get("trained_on", {})
    return {"version": verified.manifest.version, "trained_at": verified.manifest.created_at,
            "trained_on": trained_on, "rows_scored_by_this_version": scored,
            "rows_in_hotspots": sum(h["rows"] for h in out), "quality": artifact.quality, "hotspots": out}


def text(report: dict) -> list:
    out = [f"{report['model_id']}: {len(report['hotspots'])} hotspot(s) of hotspots v{report['version']}; the window "
           f"{report['start']} to {report['end']} ({report['rows_scored_by_this_version']:,} rows scored by it, {report['rows_in_hotspots']:,} in a hotspot)"]
    on = report.get("trained_on") or {}
    if on:
        out.append(f"trained {report['trained_at']} on {on.get('reference_rows', 0):,} reference rows and "
                   f"{on.get('stream_rows', 0):,} labelled stream rows"
                   + (f" of {on['stream_from']} to {on['stream_to']}" if on.get("stream_rows") else "")
                   + (f" ({on['stream_note']})" if on.get("stream_note") else ""))
    if not report["hotspots"]:
        out.append("no region where the model is often wrong was found in training")
    for h in report["hotspots"]:
        out.append(f"\n{h['id']}: {' AND '.join(h['rules'])}")
        out.append((["", "rows", "labelled", "accuracy"],
                    [["training", h["training_rows"], h["training_rows"], h["training_accuracy"]],
                     ["window", h["rows"], h["labelled"], h["accuracy"]]]))
    return out
