"""The steps of a training run, as its workflow runs them: `enricher pipeline STEP`.

    prepare   stage the model's spec and reference data for the run
    train     fit one enrichment on the staged data (one that follows the stream,
              hotspots, also on the labelled rows of a recent window read
              from the enriched tables: pipelines/labelled.py), stage its files
    validate  load one staged result as a worker would and check its output
    publish   make it a new artifact version, mark it ready, announce it
    cleanup   remove the run's staging (the workflow's exit handler)

Steps hand over through the run's staging folder in the artifact store
(`<store>/_runs/<run>/<model>/`), never through local disk, so each may run in its
own container on its own machine, as Argo runs them. A failing step raises
StepError; an enrichment is published only if its own train and validate
passed, whatever became of the others.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from enricher.models import ENRICHMENTS
from enricher.models.artifact import FORMAT_VERSION, ArtifactStore, Manifest
from enricher.models.catalog import checked_output, out_of_bounds
from enricher.models.enrichment import InferenceBatch, ModelFile, Unusable, published_parameters, stream_training
from enricher.models.registry import ModelRegistry
from enricher.models.spec import ModelSpec

from enricher.errors import EnricherError, UserError

from .labelled import LabelledRows, combined

log = logging.getLogger("enricher.pipeline")
VALIDATION_ROWS = 2000


class StepError(EnricherError, RuntimeError):
    """A step that cannot succeed; the message says why."""


def _staged(store: ArtifactStore, run: str, model_id: str, *parts: str) -> str:
    # A run may train a batch of models: each has its own folder in the run's.
    return store.files.path("_runs", run, model_id, *parts)


def _read(store: ArtifactStore, run: str, model_id: str, *parts: str) -> bytes:
    try:
        return store.files.read(_staged(store, run, model_id, *parts))
    except FileNotFoundError:
        raise StepError(f"run {run}: {model_id}/{'/'.join(parts)} is not staged (did the step before it run?)") \
            from None


def _spec(store: ArtifactStore, run: str, model_id: str) -> ModelSpec:
    return ModelSpec.from_json(model_id, json.loads(_read(store, run, model_id, "spec.json")), stored=True)


def _reference(store: ArtifactStore, run: str, model_id: str) -> pa.Table:
    return pq.read_table(io.BytesIO(_read(store, run, model_id, "reference.parquet")))


def _model_file(store: ArtifactStore, run: str, model_id: str) -> ModelFile | None:
    staged = [i for i in store.files.listing(_staged(store, run, model_id, "model_file"))
              if i.type == pafs.FileType.File]
    if not staged:
        return None
    return ModelFile(staged[0].base_name, _read(store, run, model_id, "model_file", staged[0].base_name))


def prepare(registry: ModelRegistry, store: ArtifactStore, model_id: str, run: str) -> int:
    """Snapshot the spec and reference data, so every step of the run sees the same."""
    spec = registry.get(model_id)
    try:
        reference = registry.reference(model_id)
    except FileNotFoundError:
        raise StepError(f"model {model_id}: its reference data is missing from the registry "
                        f"(register the model again: PUT /models/{model_id})") from None
    except (OSError, ValueError, pa.ArrowException) as exc:  # a file that is not (or no longer) Parquet
        raise StepError(f"model {model_id}: its reference data cannot be read ({exc}); "
                        f"register the model again: PUT /models/{model_id}") from None
    if reference.num_rows == 0:
        raise StepError(f"model {model_id}: the reference data has no rows")
    buf = io.BytesIO()
    pq.write_table(reference, buf)
    store.files.write(_staged(store, run, model_id, "spec.json"), json.dumps(spec.to_json()).encode())
    store.files.write(_staged(store, run, model_id, "reference.parquet"), buf.getvalue())
    model_file = registry.model_file(model_id)
    if model_file is not None:  # the user's own model, for the enrichments that explain it
        store.files.write(_staged(store, run, model_id, "model_file", model_file[0]), model_file[1])
    log.info("run %s: staged %d reference rows of %s", run, reference.num_rows, model_id)
    return reference.num_rows


def _known(enrichment: str) -> None:
    if enrichment not in ENRICHMENTS:
        raise StepError(f"unknown enrichment {enrichment!r}; known: {', '.join(sorted(ENRICHMENTS))}")


def _still_this_runs(registry: ModelRegistry, model_id: str, run: str, enrichment: str) -> None:
    """A newer run took this enrichment over (a toggle while this run went on): train nothing,
    and leave its status, which names the newer run, alone. (A run of one model is stopped
    when superseded; a batch run goes on for its other models, and this is what stops its
    branch for this one.)"""
    status = registry.status(model_id, enrichment)
    current = status.get("workflow")
    if status.get("state") in ("pending", "training") and current not in (None, run):
        raise StepError(f"run {run}: {model_id} {enrichment} is now trained by {current}; this run's branch stops")


def train(registry: ModelRegistry, store: ArtifactStore, model_id: str, run: str, enrichment: str,
          config: dict, labelled: LabelledRows | None = None) -> dict:
    """Fit one enrichment on the staged reference data; one that learns from the stream
    (hotspots) also on the labelled rows `labelled` draws from the store (None: the
    reference data alone, and the manifest says so)."""
    _known(enrichment)
    _still_this_runs(registry, model_id, run, enrichment)
    registry.set_status(model_id, enrichment, "training", workflow=run)
    spec, reference = _spec(store, run, model_id), _reference(store, run, model_id)
    try:  # checked when it was switched on; the schema or reference may have changed since
        ENRICHMENTS[enrichment].check_model(spec, reference.schema)
    except Unusable as exc:
        raise StepError(f"model {model_id}: {enrichment} cannot be used: {exc}") from None
    try:
        following = stream_training(ENRICHMENTS[enrichment], config)
    except ValueError as exc:
        raise StepError(f"model {model_id}: {enrichment}: {exc}") from None
    trained_on = {"reference_rows": reference.num_rows}
    rows = reference
    if following is not None:
        # A store that is busy or does not answer raises Unavailable (or a connection error):
        # the step is retried. A read refused (no token or a wrong one, a query the guard or
        # ClickHouse refuses) fails the same way every time: permanent.
        try:
            drawn = labelled.draw(spec, following) if labelled else None
        except UserError as exc:
            raise StepError(f"model {model_id}: {enrichment}: the labelled rows could not be read: {exc}") from None
        trained_on.update(drawn.record() if drawn else {"stream_rows": 0, "stream_note": "the store was not read"})
        if drawn:
            rows = combined(reference, drawn)
    try:
        fitted = ENRICHMENTS[enrichment].fit(spec, rows, config, _model_file(store, run, model_id))
    except ValueError as exc:  # the inputs refused (a model file, a setting): the same on every retry
        raise StepError(f"model {model_id}: {enrichment}: {exc}") from None
    blobs = fitted.to_blobs()
    for name, data in blobs.items():
        store.files.write(_staged(store, run, model_id, enrichment, name), data)
    parameters = published_parameters(fitted)
    if following is not None:  # where its rows came from, on the manifest
        parameters["trained_on"] = trained_on
    meta = {"training_rows": rows.num_rows, "parameters": parameters,
            "files": {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}}
    store.files.write(_staged(store, run, model_id, enrichment, "meta.json"), json.dumps(meta).encode())
    log.info("run %s: trained %s on %d rows (%s)", run, enrichment, rows.num_rows,
             ", ".join(f"{k} {v}" for k, v in trained_on.items()))
    return meta


def _staged_result(store: ArtifactStore, run: str, model_id: str, enrichment: str):
    meta = json.loads(_read(store, run, model_id, enrichment, "meta.json"))
    blobs = {}
    for name, digest in meta["files"].items():
        data = _read(store, run, model_id, enrichment, name)
        if hashlib.sha256(data).hexdigest() != digest:
            raise StepError(f"run {run}: staged {enrichment}/{name} changed after training")
        blobs[name] = data
    return meta, blobs


def validate(registry: ModelRegistry, store: ArtifactStore, model_id: str, run: str,
             enrichment: str) -> int:
    """Load the staged result the way a worker will and score reference rows with it;
    returns how many rows it was checked on."""
    _known(enrichment)
    spec, reference = _spec(store, run, model_id), _reference(store, run, model_id)
    sample = reference.slice(0, VALIDATION_ROWS)
    batch = InferenceBatch.from_reference(spec, sample)
    meta, blobs = _staged_result(store, run, model_id, enrichment)
    manifest = Manifest(FORMAT_VERSION, model_id, enrichment, 0, meta["files"], meta["training_rows"],
                        meta["parameters"], "", run)
    try:
        fitted = ENRICHMENTS[enrichment].load(spec, manifest, blobs)
        out = fitted.transform(batch)
    except Exception as exc:
        raise StepError(f"run {run}: {enrichment} does not load or score: {exc}") from exc
    try:  # the same check serving applies to every batch
        out = checked_output(enrichment, spec, out, sample.num_rows)
    except (ValueError, TypeError, pa.ArrowException) as exc:
        raise StepError(f"run {run}: {exc}") from None
    try:  # what training measured, against the bar the config sets (e.g. a surrogate's fidelity)
        settings = {k: v for k, v in meta["parameters"].items() if k != "quality"}
        ENRICHMENTS[enrichment].check_quality(meta["parameters"].get("quality", {}), settings)
    except ValueError as exc:
        raise StepError(f"run {run}: {exc}") from None
    wrong = out_of_bounds(enrichment, spec, out)
    if wrong:
        raise StepError(f"run {run}: {wrong}")
    log.info("run %s: %s validated on %d reference rows", run, enrichment, sample.num_rows)
    return sample.num_rows


def publish(registry: ModelRegistry, store: ArtifactStore, model_id: str, run: str, enrichment: str,
            announce=None) -> int | None:
    """Publish the validated result, unless a newer run or a toggle has overtaken it;
    returns the version published (None: not published, and why is logged)."""
    _known(enrichment)
    status = registry.status(model_id, enrichment)
    if status.get("workflow") not in (None, run):
        log.warning("run %s: %s is now %s's; not publishing", run, enrichment, status.get("workflow"))
        return None
    if not registry.enrichments(model_id)[enrichment]["enabled"]:
        log.warning("run %s: %s was turned off meanwhile; not publishing", run, enrichment)
        return None
    meta, blobs = _staged_result(store, run, model_id, enrichment)
    manifest = store.publish(model_id, enrichment, blobs, meta["training_rows"], meta["parameters"],
                             workflow=run)
    registry.set_status(model_id, enrichment, "ready", workflow=run, version=manifest.version)
    log.info("run %s: published %s v%d", run, enrichment, manifest.version)
    registry.touch()  # workers reload on their next look; the announcement makes that now
    if announce:
        announce("artifact_published", model_id, enrichment=enrichment, version=manifest.version, workflow=run)
    return manifest.version


def cleanup(store: ArtifactStore, run: str) -> None:
    """Remove the run's staging, whatever became of its steps (idempotent)."""
    store.files.delete_dir(store.files.path("_runs", run))
