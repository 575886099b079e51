"""Fit every enabled enrichment of a model and publish its artifact, by hand.

`enricher train` runs, in this process, the very steps a training workflow
runs (pipelines/steps.py: prepare, then per enrichment train -> validate ->
publish, then cleanup), so an artifact trained by hand passes the same
validation as one trained by a toggle, and, as in the workflow, one
enrichment failing does not keep the others from publishing. It reads the
registry and writes the artifact store (and, for an enrichment that follows
the stream, reads its labelled rows from the enriched tables), and talks to
nothing else (no announcement: workers see the registry's new generation).
"""

from __future__ import annotations

import time

from enricher.models.artifact import ArtifactStore, Manifest
from enricher.models.registry import ModelRegistry

from enricher.errors import EnricherError, UserError

from . import steps
from .labelled import LabelledRows


class TrainingFailed(EnricherError, ValueError):
    """Some enrichments failed; `published` holds the manifests of those that did not."""

    def __init__(self, message: str, published: list[Manifest]):
        super().__init__(message)
        self.published = published


def train(registry: ModelRegistry, store: ArtifactStore, model_id: str,
          only: list[str] | None = None, log=print, labelled: LabelledRows | None = None) -> list[Manifest]:
    """Train `model_id`'s enabled enrichments (or just those in `only`); `labelled` reads
    the stream's labelled rows for those that learn from them (hotspots; None: the
    reference data alone)."""
    registry.get(model_id)
    enabled = registry.enabled(model_id)
    if only:
        missing = [n for n in only if n not in enabled]
        if missing:
            raise UserError(f"model {model_id!r}: {', '.join(missing)} not enabled; "
                             f"turn it on with `enricher enrichments set {model_id} {missing[0]}=on`")
        enabled = {n: enabled[n] for n in only}
    if not enabled:
        raise UserError(f"model {model_id!r} has no enrichment enabled; "
                         f"e.g. `enricher enrichments set {model_id} anomaly_detection=on`")
    run = f"manual-{model_id.replace('_', '-')}-{time.time_ns()}"
    published: list[Manifest] = []
    failed: dict[str, str] = {}
    try:
        try:
            rows = steps.prepare(registry, store, model_id, run)
        except steps.StepError as exc:
            for name in enabled:
                registry.set_status(model_id, name, "failed", workflow=run, step="prepare", message=str(exc))
            raise TrainingFailed(f"training {model_id} failed: {exc}", []) from None
        for name in sorted(enabled):
            started = time.perf_counter()
            step = "train"
            try:
                steps.train(registry, store, model_id, run, name, enabled[name], labelled)
                step = "validate"
                steps.validate(registry, store, model_id, run, name)
                step = "publish"
                version = steps.publish(registry, store, model_id, run, name)
            except steps.StepError as exc:
                registry.set_status(model_id, name, "failed", workflow=run, step=step, message=str(exc))
                failed[name] = f"{step}: {exc}"
                log(f"{name} for {model_id} failed at {step}: {exc}")
                continue
            if version is None:
                continue
            manifest = store.load(model_id, name, version).manifest
            log(f"trained {name} for {model_id}: version {version}, {rows} reference rows, "
                f"{time.perf_counter() - started:.2f}s (validated as a workflow validates)")
            published.append(manifest)
    finally:
        steps.cleanup(store, run)
    if failed:
        kept = (f"; published: {', '.join(m.enrichment for m in published)}" if published
                else "; nothing published")
        raise TrainingFailed(f"training {model_id} failed for {', '.join(sorted(failed))} "
                             f"(each keeps serving its current version, if any){kept}. "
                             + " | ".join(f"{n}: {why}" for n, why in sorted(failed.items())), published)
    return published
