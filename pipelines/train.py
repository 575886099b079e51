"""Fit every enabled enrichment of a model and publish its artifact, by hand.

`enricher train` runs, in this process, the very steps a training workflow
runs (pipelines/steps.py: prepare -> train -> validate -> publish), so an
artifact trained by hand passes the same validation as one trained by a
toggle. It reads the registry and writes the artifact store, and talks to
nothing else (no announcement: workers see the registry's new generation).
"""

from __future__ import annotations

import time

from models.artifact import ArtifactStore, Manifest
from models.registry import ModelRegistry

from . import steps


def train(registry: ModelRegistry, store: ArtifactStore, model_id: str,
          only: list[str] | None = None, log=print) -> list[Manifest]:
    """Train `model_id`'s enabled enrichments (or just those in `only`)."""
    registry.get(model_id)
    enabled = registry.enabled(model_id)
    if only:
        missing = [n for n in only if n not in enabled]
        if missing:
            raise ValueError(f"model {model_id!r}: {', '.join(missing)} not enabled; "
                             f"turn it on with `enricher enrichments set {model_id} {missing[0]}=on`")
        enabled = {n: enabled[n] for n in only}
    if not enabled:
        raise ValueError(f"model {model_id!r} has no enrichment enabled; "
                         f"e.g. `enricher enrichments set {model_id} anomaly_detection=on`")
    run = f"manual-{model_id.replace('_', '-')}-{time.time_ns()}"
    started = time.perf_counter()
    try:
        rows = steps.prepare(registry, store, model_id, run)
        for name, config in enabled.items():
            steps.train(registry, store, model_id, run, name, config)
        steps.validate(registry, store, model_id, run, sorted(enabled))
        versions = steps.publish(registry, store, model_id, run, sorted(enabled))
    except steps.StepError as exc:
        for name in enabled:
            registry.set_status(model_id, name, "failed", workflow=run, message=str(exc))
        store.files.delete_dir(store.files.path("_runs", run))
        raise ValueError(f"training {model_id} failed: {exc}") from None
    published = []
    for name, version in versions.items():
        manifest = store.load(model_id, name, version).manifest
        log(f"trained {name} for {model_id}: version {version}, {rows} reference rows, "
            f"{time.perf_counter() - started:.2f}s (validated as a workflow validates)")
        published.append(manifest)
    return published
