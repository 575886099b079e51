"""Fit every enabled enrichment of a model and publish its artifact.

By hand (`enricher train`), in this process; toggles normally train through
a workflow instead (pipelines/workflow.py, pipelines/steps.py). It reads the
registry and writes the artifact store, and talks to nothing else.
"""

from __future__ import annotations

import time

from models import ENRICHMENTS
from models.artifact import ArtifactStore, Manifest
from models.registry import ModelRegistry


def train(registry: ModelRegistry, store: ArtifactStore, model_id: str,
          only: list[str] | None = None, log=print) -> list[Manifest]:
    """Train `model_id`'s enabled enrichments (or just those in `only`)."""
    spec = registry.get(model_id)
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
    reference = registry.reference(model_id)
    published = []
    for name, config in enabled.items():
        started = time.perf_counter()
        fitted = ENRICHMENTS[name].fit(spec, reference, config)
        manifest = store.publish(model_id, name, fitted.to_blobs(), reference.num_rows, fitted.parameters,
                                 workflow="manual")
        registry.set_status(model_id, name, "ready", workflow="manual", version=manifest.version)
        log(f"trained {name} for {model_id}: version {manifest.version}, "
            f"{reference.num_rows} reference rows, {time.perf_counter() - started:.2f}s")
        published.append(manifest)
    registry.touch()
    return published
