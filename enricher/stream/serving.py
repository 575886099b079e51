"""What the worker serves with: model specs, toggles and loaded artifacts.

Refreshed when the registry's GENERATION changes (a registration, a toggle,
a published artifact). Artifacts are loaded lazily, on a model's first batch,
and verified before use; a version that fails verification or loading is
refused and counted, and the version already loaded keeps serving. A version
refused for what it holds (it fails verification, its manifest or files are
unusable) is not read again; one refused because it could not be read (the
object store did not answer, an I/O error) is tried again after
RETRY_UNREADABLE_SECONDS, so a passing outage does not leave its columns NULL
until a newer version is published.

Many models: `maintain` (the worker's refresh timer, off the event loop) also
loads every enabled model's artifacts ahead of its first batch, and holds the
artifacts of an enrichment that pools (anomaly detection) in pools, so that a
batch spread over a thousand models is scored in one pass per pool
(stream/enrich.py). A version loaded since the last pooling serves on its own
until the next tick pools it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, replace

from enricher import metrics
from enricher.models import ENRICHMENTS
from enricher.models.artifact import ArtifactError, ArtifactStore
from enricher.models.registry import ModelRegistry, UnknownModel
from enricher.models.spec import ModelSpec

log = logging.getLogger(__name__)

RETRY_UNREADABLE_SECONDS = 30.0


@dataclass
class Active:
    """One enrichment serving a model: its artifact version and fitted object."""

    name: str
    version: int
    fitted: object
    #: (pool, member) when this artifact is scored together with other models' (maintain)
    pooled: tuple | None = None


class Serving:
    def __init__(self, registry: ModelRegistry, store: ArtifactStore, min_refresh: float = 1.0):
        self.registry = registry
        self.store = store
        self.min_refresh = min_refresh
        self._lock = threading.Lock()
        self._generation = -1
        self._checked = 0.0
        self._specs: dict[str, ModelSpec] = {}
        self._enabled: dict[str, dict[str, dict]] = {}
        self._active: dict[str, dict[str, Active]] = {}
        # (model, enrichment) -> (version refused, when it may be tried again: never for a bad one)
        self._refused: dict[tuple[str, str], tuple[int, float]] = {}
        self._exported: set[tuple[str, str]] = set()  # (model, enrichment) in enricher_artifact_version
        self.retry_unreadable = RETRY_UNREADABLE_SECONDS
        self._retry_at = math.inf  # when to look again at what could not be read
        self._pooled: dict[str, list] = {}  # enrichment -> the (model, fitted) its pools were built from
        self.refresh()

    # -- lookups used on the hot path ----------------------------------
    def spec(self, model_id: str) -> ModelSpec | None:
        spec = self._specs.get(model_id)
        if spec is None and time.monotonic() - self._checked > self.min_refresh:
            # A model registered after the worker started: look again, at most
            # once per min_refresh, so a stream of unknown ids costs nothing.
            self.refresh()
            spec = self._specs.get(model_id)
        return spec

    def specs(self) -> list[ModelSpec]:
        """Every registered model's spec, as last read from the registry."""
        return list(self._specs.values())

    def active(self, model_id: str) -> dict[str, Active]:
        """The enrichments serving this model now; loads artifacts on first use."""
        loaded = self._active.get(model_id)
        if loaded is None:
            with self._lock:
                loaded = self._active.get(model_id)
                if loaded is None:
                    loaded = self._load(model_id, {})
                    self._active[model_id] = loaded
                    self._export_versions(model_id)
        return loaded

    # -- change handling ----------------------------------------------
    def refresh(self) -> bool:
        """Re-read the registry if its generation moved (or a version that could
        not be read is due to be tried again); returns whether it did."""
        self._checked = time.monotonic()
        generation = self.registry.generation()
        retry_due = self._retry_at <= self._checked or \
            any(at <= self._checked for _, at in self._refused.values())
        if generation == self._generation and not retry_due:
            return False
        self._retry_at = math.inf
        with self._lock:
            specs, enabled = {}, {}
            for model_id in self.registry.ids():
                try:
                    specs[model_id] = self.registry.get(model_id)
                    enabled[model_id] = self.registry.enabled(model_id)
                except (UnknownModel, ValueError) as exc:
                    log.error("model %s: cannot be read from the registry: %s", model_id, exc)
            changed_specs = {m for m in specs if specs[m] != self._specs.get(m)}
            self._specs, self._enabled = specs, enabled
            # Reload what is loaded already (new versions, toggles); models not
            # seen yet stay unloaded until their first batch.
            active = {}
            for model_id, previous in self._active.items():
                if model_id in specs:
                    keep = {} if model_id in changed_specs else previous
                    active[model_id] = self._load(model_id, keep)
            self._active = active
            self._generation = generation
            self._export_versions()
        return True

    def maintain(self) -> None:
        """The refresh timer's work, off the event loop: re-read the registry, load what is
        enabled but not loaded yet (ahead of its model's first batch), and pool what pools."""
        self.refresh()
        for model_id in list(self._specs):
            if model_id not in self._active:
                self.active(model_id)  # one model at a time: the lock is held briefly
        self.pool()

    def pool(self) -> None:
        """(Re)build the pools of each enrichment that pools, when what serves has changed
        since the last build. Built outside the lock; an artifact swapped meanwhile keeps
        serving on its own until the next build."""
        for name, enrichment in ENRICHMENTS.items():
            make = getattr(enrichment, "pool", None)
            if make is None:
                continue
            serving = [(m, act[name]) for m, act in list(self._active.items()) if name in act]
            built_from = [(m, a.fitted) for m, a in serving]
            before = self._pooled.get(name)
            if before is not None and len(before) == len(built_from) and all(
                    m == n and f is g for (m, f), (n, g) in zip(before, built_from)):
                continue
            try:
                pools = make([a.fitted for _, a in serving]) if serving else []
            except Exception:  # noqa: BLE001 - each model serves on its own, as before pooling
                log.exception("%s: pooling %d artifacts failed; each serves on its own", name, len(serving))
                pools = []
            with self._lock:
                pooled = {i: (pool, j) for pool, members in pools for j, i in enumerate(members)}
                for i, (model_id, act) in enumerate(serving):
                    current = self._active.get(model_id, {})
                    if current.get(name) is act:  # not swapped or turned off meanwhile
                        self._active[model_id] = {**current, name: replace(act, pooled=pooled.get(i))}
            self._pooled[name] = built_from

    def _export_versions(self, model_id: str | None = None) -> None:
        """enricher_artifact_version follows what serves: set for each loaded
        enrichment, removed for what stopped serving (turned off, model gone).
        `model_id`: only that model was loaded (first use), and only its series are
        set: all of them on each of a thousand models' first loads took seconds."""
        if model_id is not None:
            for name, a in self._active.get(model_id, {}).items():
                metrics.ARTIFACT_VERSION.labels(model_id, name).set(a.version)
                self._exported.add((model_id, name))
            return
        now = {(m, n): a.version for m, act in self._active.items() for n, a in act.items()}
        for gone in self._exported - now.keys():
            metrics.ARTIFACT_VERSION.remove(*gone)
        for key, version in now.items():
            metrics.ARTIFACT_VERSION.labels(*key).set(version)
        self._exported = set(now)

    def _load(self, model_id: str, previous: dict[str, Active]) -> dict[str, Active]:
        spec = self._specs.get(model_id)
        out: dict[str, Active] = {}
        if spec is None:
            return out
        for name in self._enabled.get(model_id, {}):
            old = previous.get(name)
            try:
                version = self.store.current_version(model_id, name)
            except Exception as exc:  # noqa: BLE001 - the store did not answer: what serves, serves on
                log.error("model %s, %s: cannot read the current version (%s)%s; trying again in %ss",
                          model_id, name, exc, f", still serving v{old.version}" if old else "",
                          self.retry_unreadable)
                self._retry_at = min(self._retry_at, time.monotonic() + self.retry_unreadable)
                if old is not None:
                    out[name] = old
                continue
            if version is None:
                continue  # enabled but not trained yet: columns stay NULL
            if old is not None and old.version == version:
                out[name] = old
                continue
            refused = self._refused.get((model_id, name))
            if refused and refused[0] == version and time.monotonic() < refused[1]:  # not again (yet)
                if old is not None:
                    out[name] = old
                continue
            try:
                artifact = self.store.load(model_id, name, version)
                fitted = ENRICHMENTS[name].load(spec, artifact.manifest, artifact.blobs)
            except Exception as exc:  # any failure: refuse this version, keep serving the old one
                metrics.ARTIFACT_LOADS.labels(model_id, name, "refused").inc()
                # What it holds is bad (never again), or it could not be read (again later).
                bad = isinstance(exc, (ArtifactError, ValueError, KeyError, TypeError))
                self._refused[(model_id, name)] = (version, math.inf if bad else
                                                   time.monotonic() + self.retry_unreadable)
                log.error("model %s: refused %s artifact v%s: %s%s", model_id, name, version, exc,
                          f" (still serving v{old.version})" if old else "")
                if old is not None:
                    out[name] = old
                continue
            self._refused.pop((model_id, name), None)
            metrics.ARTIFACT_LOADS.labels(model_id, name, "loaded").inc()
            log.info("model %s: serving %s artifact v%s", model_id, name, version)
            out[name] = Active(name, version, fitted)
        return out

    def describe(self) -> dict:
        return {m: {n: a.version for n, a in act.items()} for m, act in self._active.items()}
