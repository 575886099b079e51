"""The control plane: models and their enrichments, by HTTP API and CLI alike.

Both doors go through ControlPlane, so a request is validated the same way,
leaves the same status behind and is announced the same way, whichever door
it came through. The registry (models/registry.py) holds the truth; every
change is also announced on the control topic, so the trigger (training) and
the workers (serving) react at once instead of at their next poll.

Status of each enrichment of each model: disabled, pending (on, waiting for a
training run), training, ready (a published artifact serves it), failed (the
last run failed; `message` and `step` say where).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

from enricher.config import Settings
from enricher.control.locations import LocationRefused, Locations
from enricher.control.registry import open_registry
from enricher.errors import NotFound, RequestError
from enricher.models import ENRICHMENTS
from enricher.models.artifact import ArtifactError, ArtifactStore
from enricher.models.reference import ReferenceDataError
from enricher.models.registry import ModelRegistry, UnknownModel
from enricher.models.spec import ModelSpec, SpecError, check_model_id

log = logging.getLogger("enricher.control")


class ControlEvents:
    """Announces changes on the control topic. The registry already holds
    them, so an announcement that cannot be sent is logged, not fatal:
    the trigger and the workers also look at the registry on their own."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._producer = None
        self._unreachable = False

    def send(self, event: str, model_id: str, **fields) -> None:
        if self._unreachable:
            return
        doc = {"event": event, "model_id": model_id, "at": time.time(), **fields}
        try:
            if self._producer is None:
                from confluent_kafka import Producer

                # log_level 2: a broker that is down is reported once, below, not per retry
                producer = Producer({**self.settings.kafka_config(), "linger.ms": 0, "log_level": 2,
                                     "message.timeout.ms": 5000})
                producer.list_topics(timeout=2)  # fails fast when no broker answers
                self._producer = producer
            self._producer.produce(self.settings.control_topic, json.dumps(doc).encode(), key=model_id.encode())
            if self._producer.flush(5) > 0:
                raise RuntimeError("not acknowledged by the broker within 5 s")
        except Exception as exc:  # noqa: BLE001 - announcing is best effort by design
            self._unreachable = self._producer is None
            log.warning("could not announce %s for model %s on %s (%s); the registry has it, and the "
                        "trigger and workers will see it when they next look", event, model_id,
                        self.settings.control_topic, exc)


class ControlPlane:
    def __init__(self, registry: ModelRegistry, store: ArtifactStore, events: ControlEvents | None = None,
                 locations: Locations | None = None):
        """`locations`: where a remote caller may point reference data and model
        files (locations.py); None for the operator's own in-process calls."""
        self.registry = registry
        self.store = store
        self.events = events
        self.locations = locations

    @classmethod
    def from_settings(cls, settings: Settings, announce: bool = True) -> "ControlPlane":
        return cls(open_registry(settings), settings.artifacts(),
                   ControlEvents(settings) if announce else None)

    def _announce(self, event: str, model_id: str, **fields) -> None:
        self.registry.touch()
        if self.events:
            self.events.send(event, model_id, **fields)

    # -- reads -------------------------------------------------------------
    def list_models(self) -> list[dict]:
        out = []
        for model_id in self.registry.ids():
            spec = self.registry.get(model_id)
            out.append({"model_id": model_id, "task": spec.task, "features": len(spec.features),
                        "attributes": len(spec.attributes),
                        "enrichments": {n: e["status"] for n, e in self.enrichments(model_id).items()}})
        return out

    def model(self, model_id: str) -> dict:
        self._known(model_id)
        stored = self.registry.model_file(model_id)
        return {"model_id": model_id, "schema": self.registry.get(model_id).to_json(),
                "model_file": stored[0] if stored else None, "enrichments": self.enrichments(model_id)}

    def enrichments(self, model_id: str) -> dict[str, dict]:
        """Every enrichment of the model: toggle, config, status, serving version, workflow, when."""
        self._known(model_id)
        out = {}
        for name, toggle in self.registry.enrichments(model_id).items():
            status = self.registry.status(model_id, name)
            state = status.get("state") or "pending"
            if not toggle["enabled"]:
                state = "disabled"
            try:
                version = self.store.current_version(model_id, name)
                # what training measured for the serving version (e.g. the surrogate's fidelity)
                quality = next((m.parameters.get("quality") for m in self.store.manifests(model_id, name)
                                if m.version == version), None) if version else None
            except ArtifactError:
                version = quality = None
            out[name] = {"enabled": toggle["enabled"], "config": toggle["config"], "status": state,
                         "version": version, "quality": quality, "workflow": status.get("workflow"),
                         "updated_at": status.get("updated_at"), "message": status.get("message"),
                         "step": status.get("step")}
        return out

    def _known(self, model_id: str) -> None:
        try:
            check_model_id(model_id)
            self.registry.get(model_id)
        except SpecError as exc:
            raise RequestError(str(exc), "model_id") from None
        except UnknownModel as exc:
            raise NotFound(str(exc), "model_id") from None

    # -- writes ------------------------------------------------------------
    def put_model(self, model_id: str, body) -> tuple[bool, dict]:
        """Register a model, or replace its schema and reference data. Returns (created, model)."""
        try:
            check_model_id(model_id)
        except SpecError as exc:
            raise RequestError(str(exc), "model_id") from None
        if not isinstance(body, dict):
            raise RequestError('body must be a JSON object {"schema": {...}, "reference": "PATH or URL"}', "")
        unknown = sorted(set(body) - {"schema", "reference", "model_file"})
        if unknown:
            raise RequestError(f"unknown field(s) {unknown}; a model takes schema, reference and model_file",
                               unknown[0])
        if body.get("model_file") is not None and (not isinstance(body["model_file"], str) or not body["model_file"]):
            raise RequestError("model_file: the location of the model's own file (XGBoost .json or LightGBM .txt), "
                               "a string", "model_file")
        if "schema" not in body:
            raise RequestError("schema: missing (the model's features, task, ...)", "schema")
        try:
            ModelSpec.from_json(model_id, body["schema"])  # the schema first: its errors name their key
        except SpecError as exc:
            text = str(exc)
            raise RequestError(text, text.split(":", 1)[0] if text.startswith("schema") else "schema") from None
        reference = body.get("reference")
        if not isinstance(reference, str) or not reference:
            raise RequestError("reference: the location of the reference data (.parquet or .csv), a string",
                               "reference")
        model_file = body.get("model_file")
        if self.locations is not None:
            try:
                reference = self.locations.resolve(reference, "reference")
                if model_file is not None:
                    model_file = self.locations.resolve(model_file, "model_file")
            except LocationRefused as exc:
                raise RequestError(str(exc), str(exc).split(":", 1)[0]) from None
        with self.registry.locked():
            return self._put_model(model_id, body, reference, model_file)

    def _put_model(self, model_id: str, body: dict, reference: str, model_file: str | None) -> tuple[bool, dict]:
        created = model_id not in self.registry.ids()
        try:
            self.registry.register(model_id, body["schema"], reference, model_file)
        except (SpecError, ReferenceDataError, FileNotFoundError, OSError) as exc:
            text = str(exc)
            if text.startswith("model_file:") or text.startswith("model file"):
                raise RequestError(text if text.startswith("model_file:") else f"model_file: {text}",
                                   "model_file") from None
            raise RequestError(f"reference: {exc}", "reference") from None
        # New reference data: whatever is on must be trained again.
        for name, toggle in self.registry.enrichments(model_id).items():
            if toggle["enabled"]:
                self.registry.set_status(model_id, name, "pending", reason="reference data changed")
        self._announce("model_registered", model_id)
        return created, next(m for m in self.list_models() if m["model_id"] == model_id)

    def patch_enrichments(self, model_id: str, body) -> dict[str, dict]:
        """Body: {"anomaly_detection": {"enabled": true, "config": {...}}, ...}.

        Holds the registry's lock throughout: two PATCHes at once (threads or
        processes) apply one after the other, each on the state the other
        left, each changing only the fields it names."""
        with self.registry.locked():
            return self._patch_enrichments(model_id, body)

    def _patch_enrichments(self, model_id: str, body) -> dict[str, dict]:
        self._known(model_id)
        if not isinstance(body, dict) or not body:
            raise RequestError('body must be a JSON object like {"anomaly_detection": {"enabled": true}}', "")
        current = self.registry.enrichments(model_id)
        changes = {}
        for name, change in body.items():
            if name not in ENRICHMENTS:
                raise RequestError(f"unknown enrichment {name!r}; known: {', '.join(sorted(ENRICHMENTS))}", name)
            if not isinstance(change, dict):
                raise RequestError(f"{name}: expected an object with enabled and/or config", name)
            unknown = sorted(set(change) - {"enabled", "config"})
            if unknown:
                raise RequestError(f"{name}.{unknown[0]}: unknown; an enrichment takes enabled and config",
                                   f"{name}.{unknown[0]}")
            enabled = change.get("enabled", current[name]["enabled"])
            if not isinstance(enabled, bool):
                raise RequestError(f"{name}.enabled: expected true or false, got {enabled!r}", f"{name}.enabled")
            if enabled and not current[name]["enabled"]:
                try:  # before any training: the model must have what the enrichment needs
                    self.registry.check_usable(model_id, name)
                except SpecError as exc:
                    raise RequestError(f"{name}: this model cannot use it: {exc}", f"{name}.enabled") from None
            config = change.get("config", current[name]["config"])
            if not isinstance(config, dict):
                raise RequestError(f"{name}.config: expected an object", f"{name}.config")
            try:
                ENRICHMENTS[name].check_config(config)  # stored as given; defaults fill in at training
            except (ValueError, TypeError) as exc:
                text = str(exc)
                where = text.split(":", 1)[0]  # e.g. "anomaly_detection.n_estimators"
                key = where.split(".", 1)[1] if where.startswith(f"{name}.") else None
                raise RequestError(text, f"{name}.config" + (f".{key}" if key else "")) from None
            changes[name] = (enabled, config, "enabled" in change, "config" in change)
        for name, (enabled, config, set_enabled, set_config) in changes.items():  # all validated: now apply
            was = current[name]
            check = ENRICHMENTS[name].check_config
            self.registry.set_enrichment(model_id, name, enabled if set_enabled else None,
                                         config if set_config else None)
            if not enabled:  # what made the last artifact stays on record
                last = self.registry.status(model_id, name)
                self.registry.set_status(model_id, name, "disabled", workflow=last.get("workflow"),
                                         version=last.get("version"))
            elif not was["enabled"] or check(config) != check(was["config"]) or \
                    self.registry.status(model_id, name).get("state") in (None, "failed", "disabled"):
                self.registry.set_status(model_id, name, "pending")  # a run is needed
        self._announce("enrichments_changed", model_id,
                       enabled=sorted(n for n, (on, *_) in changes.items() if on),
                       disabled=sorted(n for n, (on, *_) in changes.items() if not on))
        return self.enrichments(model_id)

    def retrain(self, model_id: str, body) -> dict[str, dict]:
        """Train enabled enrichments again, with the settings they have: body
        {"enrichments": [NAME, ...]}, or {} for every enabled one. Each goes back
        to pending; the trigger runs them as it runs a toggle (hotspots then learn
        from the stream's latest labels). The serving version serves until then."""
        with self.registry.locked():
            self._known(model_id)
            if not isinstance(body, dict) or set(body) - {"enrichments"}:
                raise RequestError('body must be a JSON object: {"enrichments": ["hotspots"]}, or {} for '
                                   "every enabled enrichment", "")
            enabled = self.registry.enabled(model_id)
            names = body.get("enrichments", sorted(enabled))
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise RequestError("enrichments: a list of enrichment names", "enrichments")
            for name in names:
                if name not in ENRICHMENTS:
                    raise RequestError(f"unknown enrichment {name!r}; known: {', '.join(sorted(ENRICHMENTS))}",
                                       "enrichments")
                if name not in enabled:
                    raise RequestError(f"{name} is off for {model_id}: turn it on (which trains it) rather "
                                       "than retrain it", "enrichments")
            if not names:
                raise RequestError(f"model {model_id} has no enrichment on: nothing to retrain", "enrichments")
            for name in names:
                self.registry.set_status(model_id, name, "pending", reason="retrain requested")
            self._announce("retrain_requested", model_id, enrichments=sorted(names))
        return self.enrichments(model_id)


def follow_announcements(settings: Settings, refresh: Callable[[], bool]) -> None:
    """Hear every announcement on the control topic (partitions assigned, no consumer
    group: every worker hears each) and call `refresh` at once; runs for the process's
    life, in a thread of its own. The caller's refresh timer covers whatever this misses."""
    from confluent_kafka import OFFSET_END, Consumer, TopicPartition

    try:
        consumer = Consumer({**settings.kafka_config(), "group.id": f"{settings.consumer_group}-announcements",
                             "enable.auto.commit": False})
        consumer.assign([TopicPartition(settings.control_topic, 0, OFFSET_END)])
    except Exception as exc:  # noqa: BLE001 - the refresh timer still covers it
        log.warning("not following %s (%s); changes are picked up every %ss", settings.control_topic, exc,
                    settings.refresh_interval)
        return
    while True:
        messages = [m for m in consumer.consume(100, timeout=1.0) if not m.error()]
        if messages:
            try:
                if refresh():
                    log.info("refreshed on an announcement (%d event(s))", len(messages))
            except Exception:  # noqa: BLE001 - keep listening; the timer retries too
                log.exception("refresh after an announcement failed")
