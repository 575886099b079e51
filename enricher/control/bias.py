"""Bias mitigation's trade-off curves, and choosing another point of them.

The serving bias_mitigation artifact holds, for each constraint, the whole
curve of rules from exact fairness to the most accurate (models/bias.py).
`curves` reads it (verified, like every artifact load); `choose` publishes the
same curves with another chosen point as a new version, with no retraining,
and announces it, so workers switch at once. The CLI (`enricher bias curve`,
`enricher bias choose`) and the API (`GET /models/{id}/bias/curves`,
`PUT /models/{id}/bias/choice`) call these.
"""

from __future__ import annotations

from enricher.errors import Conflict, InvalidArgument, NotFound, UserError
from enricher.models.artifact import ArtifactError
from enricher.models.bias import CONSTRAINTS, NAME, BiasArtifact, BiasMitigation
from enricher.models.enrichment import published_parameters
from enricher.models.registry import UnknownModel
from enricher.models.spec import SpecError, check_model_id


def _serving(plane, model_id: str) -> tuple[BiasArtifact, int]:
    try:
        spec = plane.registry.get(check_model_id(model_id))
    except (SpecError, UnknownModel) as exc:
        raise NotFound(str(exc), "model_id") from None
    try:
        verified = plane.store.load(model_id, NAME)
    except ArtifactError as exc:
        raise Conflict(f"{exc} (turn {NAME} on, and wait for its status to be ready)", NAME) from None
    return BiasMitigation().load(spec, verified.manifest, verified.blobs), verified.manifest.version


def curves(plane, model_id: str, constraint: str | None = None) -> dict:
    """The serving version's curves (one constraint's, or all), each point's accuracy and gap on
    the reference rows (randomised, and with one threshold per group), the chosen point marked."""
    artifact, version = _serving(plane, model_id)
    doc = artifact.doc
    if constraint is not None and constraint not in CONSTRAINTS:
        raise InvalidArgument(f"constraint {constraint!r}: one of {', '.join(CONSTRAINTS)}", "constraint")
    shown = [constraint] if constraint else list(doc["curves"])
    return {"model_id": model_id, "version": version, "attribute": doc["attribute"], "mode": doc["mode"],
            "chosen": {"constraint": doc["constraint"], "index": doc["chosen"]},
            "raw": {c: doc["raw"][c][doc["attribute"]] for c in shown},
            "curves": {c: [{"index": i, "tol": p["tol"], "accuracy": p["accuracy"], "gap": p["gap"],
                            "deterministic_accuracy": p["deterministic"]["accuracy"],
                            "deterministic_gap": p["deterministic"]["gap"],
                            "thresholds": p["deterministic"]["thresholds"], "rules": p["rules"]}
                           for i, p in enumerate(doc["curves"][c][doc["attribute"]])] for c in shown}}


def choose(plane, model_id: str, body) -> dict:
    """Publish the serving curves with another point chosen: {"constraint": C, "index": I}."""
    if not isinstance(body, dict) or set(body) - {"constraint", "index"} or "index" not in body:
        raise InvalidArgument('body must be {"constraint": "equal_opportunity", "index": 40} (constraint '
                              "optional: the serving one)", "")
    artifact, _ = _serving(plane, model_id)
    constraint = body.get("constraint") or artifact.doc["constraint"]
    try:
        chosen = artifact.choose(constraint, body["index"])
    except ValueError as exc:
        raise InvalidArgument(str(exc), str(exc).split(" ", 1)[0]) from None
    manifest = plane.store.publish(model_id, NAME, chosen.to_blobs(), plane.store.load(model_id, NAME).manifest
                                   .training_rows, published_parameters(chosen))
    kept = {k: v for k, v in plane.registry.status(model_id, NAME).items() if k not in ("state", "updated_at", "version")}
    plane.registry.set_status(model_id, NAME, "ready", **kept, version=manifest.version)
    plane.registry.touch()
    plane._announce("artifact_published", model_id, enrichment=NAME, version=manifest.version)
    return {"model_id": model_id, "version": manifest.version, "quality": chosen.quality}


def text(doc: dict) -> list:
    """The curves as the CLI prints them: lines, and tables as (columns, rows)."""
    out = [f"{doc['model_id']}: bias mitigation v{doc['version']} on {doc['attribute']!r}, {doc['mode']} "
           f"decisions; serving {doc['chosen']['constraint']} point {doc['chosen']['index']}"]
    for constraint, points in doc["curves"].items():
        raw = doc["raw"][constraint]
        out.append(f"\n{constraint} (the raw decision: accuracy {raw['accuracy']:.4f}, gap {raw['gap']:.4f})")
        step = max(1, len(points) // 20)  # every fifth point of 101, and the chosen one
        rows = [[("* " if doc["chosen"] == {"constraint": constraint, "index": p["index"]} else "") + str(p["index"]),
                 p["accuracy"], p["gap"], p["deterministic_accuracy"], p["deterministic_gap"]]
                for p in points if p["index"] % step == 0 or p["index"] == len(points) - 1
                or doc["chosen"] == {"constraint": constraint, "index": p["index"]}]
        out.append((["index", "accuracy", "gap", "deterministic_accuracy", "deterministic_gap"], rows))
    return out


def plot(doc: dict, path: str) -> None:
    """Accuracy against gap, one line per constraint, the serving point marked, as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'inference-enricher[plot]' (or matplotlib)") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for constraint, points in doc["curves"].items():
        ax.plot([p["gap"] for p in points], [p["accuracy"] for p in points], label=constraint)
        raw = doc["raw"][constraint]
        ax.scatter([raw["gap"]], [raw["accuracy"]], marker="x", color="grey")
    chosen = doc["chosen"]
    if chosen["constraint"] in doc["curves"]:
        p = doc["curves"][chosen["constraint"]][chosen["index"]]
        ax.scatter([p["gap"]], [p["accuracy"]], s=80, facecolors="none", edgecolors="red",
                   label=f"serving: {chosen['constraint']} #{chosen['index']}")
    ax.set_xlabel(f"gap between groups of {doc['attribute']!r} (reference rows)")
    ax.set_ylabel("accuracy (reference rows)")
    ax.set_title(f"{doc['model_id']}: bias mitigation trade-off (x: the raw decision)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
