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
from dataclasses import dataclass

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


# -- many models in one process (onboarding) -----------------------------------------------
@dataclass
class Outcome:
    """One model's training: what it published (enrichment -> version) and, if any failed, why."""

    model_id: str
    published: dict[str, int]
    failure: str | None = None


def candidates(registry: ModelRegistry, only: list[str] | None) -> list[str]:
    """`--all`: every registered model with an enrichment enabled (with one of `only`, if given)."""
    out = []
    for model_id in registry.ids():
        enabled = registry.enabled(model_id)
        if enabled and (not only or any(n in enabled for n in only)):
            out.append(model_id)
    return out


def train_one(registry: ModelRegistry, store: ArtifactStore, model_id: str, only: list[str] | None,
              labelled: LabelledRows | None) -> Outcome:
    """train(), with its failure as a reason instead of an exception: one model's trouble is its own."""
    if only:  # with --all, a model trains the named enrichments it has on
        try:
            only = [n for n in only if n in registry.enabled(model_id)] or only
        except Exception:  # noqa: BLE001 - an unreadable model: train() says why below
            pass
    try:
        manifests = train(registry, store, model_id, only, log=lambda message: None, labelled=labelled)
    except TrainingFailed as exc:
        return Outcome(model_id, {m.enrichment: m.version for m in exc.published}, str(exc))
    except EnricherError as exc:
        return Outcome(model_id, {}, str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug or a broken file in one model stops no other
        return Outcome(model_id, {}, f"{type(exc).__name__}: {exc}")
    return Outcome(model_id, {m.enrichment: m.version for m in manifests})


# Each pool process opens its own registry, store and store connection once (initializer).
_worker_state: dict = {}


def _pool_init(settings, open_registry) -> None:
    _worker_state.update(registry=open_registry(settings), store=settings.artifacts(),
                         labelled=LabelledRows(settings))


def _pool_train(model_id: str, only: list[str] | None) -> Outcome:
    s = _worker_state
    return train_one(s["registry"], s["store"], model_id, only, s["labelled"])


def train_many(settings, registry: ModelRegistry, model_ids: list[str], only: list[str] | None = None,
               jobs: int = 1, progress=None, open_registry=None) -> list[Outcome]:
    """Train several models, each published on its own as it finishes; `jobs` processes
    (fitting is CPU-bound and holds the GIL in places: processes, not threads), each
    opening the registry with `open_registry(settings)` (a module-level function: it is
    sent to them by name).
    `progress(done, failed, total)` is called after each model. Outcomes in the order given."""
    outcomes: dict[str, Outcome] = {}
    failed = 0

    def record(outcome: Outcome) -> None:
        nonlocal failed
        outcomes[outcome.model_id] = outcome
        failed += outcome.failure is not None
        if progress:
            progress(len(outcomes), failed, len(model_ids))

    if jobs <= 1 or len(model_ids) <= 1:
        labelled = LabelledRows(settings)
        for model_id in model_ids:
            record(train_one(registry, settings.artifacts(), model_id, only, labelled))
    else:
        if open_registry is None:
            raise ValueError("train_many with jobs > 1 needs open_registry, for its pool's processes")
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn: the pool's processes start clean (no copy of this one's threads or connections)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_pool_init, initargs=(settings, open_registry)) as pool:
            futures = {pool.submit(_pool_train, m, only): m for m in model_ids}
            for future in as_completed(futures):
                try:
                    record(future.result())
                except Exception as exc:  # noqa: BLE001 - the pool process died (killed, out of memory)
                    record(Outcome(futures[future], {}, f"its training process failed: {exc}"))
    return [outcomes[m] for m in model_ids]
