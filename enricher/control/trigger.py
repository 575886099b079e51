"""`enricher trigger`: toggles in, training workflows out, with no one in the loop.

The trigger listens on the control topic (as its own consumer group, so one
trigger acts on each event) for registrations and toggles. For each model
with a change it waits ENRICHER_TRIGGER_DEBOUNCE seconds of quiet, so rapid
toggles of one model coalesce into one run, then reconciles the model:

- the enabled enrichments waiting for a run (status pending, no workflow yet)
  make a plan; the run trains every enabled enrichment that is not ready, so
  work a superseded run had not finished is not lost;
- a run of the same model still going is stopped first: the newer one
  supersedes it (its steps also check before publishing);
- nothing enabled needs a run (an enrichment was turned off): nothing is
  trained, and a run that only trained what is now off is stopped. The
  worker stops the columns of a disabled enrichment by itself.

The workflow is built by pipelines/workflow.py for exactly that plan and
handed to the runner (local processes, or an Argo Server). Runs are followed;
each enrichment has its own branch in the run, so a failed run marks failed
only the enrichments that did not publish, each with its own step and reason. The
registry is also rescanned now and then (ENRICHER_TRIGGER_RESCAN seconds), so a
lost event delays a run but never loses it; the rescan also starts the runs
that are due on a schedule (hotspots' `retrain_every`: they learn from the
stream's labels, which change without any toggle). A user's `enricher
enrichments retrain` (POST /models/{id}/enrichments/retrain) is announced
like a toggle and run the same way.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from datetime import datetime

from prometheus_client import start_http_server

from enricher import metrics
from enricher.config import Settings
from enricher.control.registry import open_registry
from enricher.models import ENRICHMENTS
from enricher.models.enrichment import stream_training
from enricher.models.registry import ModelRegistry
from enricher.pipelines.runners import ArgoRunner, LocalRunner, RunnerError
from enricher.pipelines.workflow import (
    WorkflowOptions,
    branch_steps,
    k8s_name,
    task_prefixes,
    trains_many,
    workflow_dict,
)
from enricher.stream.topics import ensure_topics

log = logging.getLogger("enricher.trigger")
WATCHED = ("model_registered", "enrichments_changed", "retrain_requested")
RESULTS = ("succeeded", "failed", "error", "stopped")  # how a run ends (Argo's phases, and superseded)


class Trigger:
    def __init__(self, registry: ModelRegistry, runner, options: WorkflowOptions | None = None,
                 debounce: float = 1.0, batch: int = 25):
        self.registry = registry
        self.runner = runner
        self.options = options or WorkflowOptions()
        self.debounce = debounce
        self.batch = max(1, batch)                      # most models one run trains
        self.dirty: dict[str, float] = {}             # model -> time of its latest change
        self.running: dict[str, tuple[str, list]] = {}  # model -> (workflow, enrichments it trains)
        self.prefixes: dict[str, dict[str, str]] = {}  # workflow -> {model: its tasks' prefix}
        self.submitted: list[str] = []                # every workflow submitted, oldest first
        self.started: dict[str, float] = {}           # workflow -> when it was submitted (its duration)
        for result in RESULTS:  # zero before the first run ends, so increase() and rate() see it
            metrics.TRAINING_SECONDS.labels(result)
    # -- what changed ---------------------------------------------------------
    def notice(self, model_id: str, at: float | None = None) -> None:
        self.dirty[model_id] = at if at is not None else time.monotonic()

    def on_event(self, raw: bytes) -> None:
        try:
            event = json.loads(raw)
            if event.get("event") in WATCHED and isinstance(event.get("model_id"), str):
                self.notice(event["model_id"])
        except (ValueError, AttributeError):
            log.warning("ignoring a control event that is not JSON: %r", raw[:200])

    def rescan(self, now: float | None = None) -> None:
        for model_id in self.registry.ids():
            self.schedule(model_id, now)
            if self._waiting(model_id) and model_id not in self.dirty:
                self.notice(model_id, 0.0)

    def schedule(self, model_id: str, now: float | None = None) -> list[str]:
        """Enrichments that retrain on a schedule (hotspots, from the stream's labels:
        `retrain_every`) whose last run, published or failed, ended longer ago than
        that go back to pending; the rescan's run then takes them up. Returns them."""
        now = time.time() if now is None else now
        due = []
        try:
            enabled = self.registry.enabled(model_id)
        except KeyError:
            return due
        for name, config in enabled.items():
            try:
                following = stream_training(ENRICHMENTS[name], config)
            except ValueError:  # settings refused: its own run says so
                continue
            if following is None or following.every is None:
                continue
            st = self._state(model_id, name)
            if st.get("state") not in ("ready", "failed") or not st.get("updated_at"):
                continue
            try:
                age = now - datetime.fromisoformat(st["updated_at"]).timestamp()
            except (TypeError, ValueError):  # a status written by hand: not a reason to stop the trigger
                log.warning("model %s: %s has an unreadable updated_at %r; not scheduling it", model_id, name,
                            st.get("updated_at"))
                continue
            if age >= following.every:
                log.info("model %s: %s is due (retrains every %s; last run %.0f s ago)", model_id, name,
                         following.texts["retrain_every"], age)
                self.registry.set_status(model_id, name, "pending",
                                         reason=f"scheduled: retrains every {following.texts['retrain_every']}")
                due.append(name)
        return due

    def adopt(self) -> None:
        """At start: take over the runs a previous trigger left going. A run
        the runner still knows (Argo keeps them) is followed again; one it
        does not (a local run died with that trigger) is started anew."""
        for model_id in self.registry.ids():
            for name, toggle in self.registry.enrichments(model_id).items():
                st = self._state(model_id, name)
                run = st.get("workflow")
                if not toggle["enabled"] or st.get("state") not in ("pending", "training") or not run:
                    continue
                try:
                    self.runner.status(run)
                except RunnerError:
                    log.info("model %s: run %s is gone; %s goes back to pending", model_id, run, name)
                    self.registry.set_status(model_id, name, "pending", reason=f"run {run} was lost")
                    self.notice(model_id, 0.0)
                    continue
                trained = self.running.get(model_id, (run, []))[1]
                self.running[model_id] = (run, sorted(set(trained) | {name}))
        for model_id, (run, _) in self.running.items():
            self.prefixes.setdefault(run, {})[model_id] = f"{k8s_name(model_id)}-" if trains_many(run) else ""

    # -- what to do -------------------------------------------------------------
    def _state(self, model_id: str, name: str) -> dict:
        return self.registry.status(model_id, name)

    def _waiting(self, model_id: str) -> list[str]:
        """Enabled enrichments that no run has taken up yet."""
        try:
            enabled = self.registry.enabled(model_id)
        except KeyError:
            return []
        out = []
        for name in enabled:
            st = self._state(model_id, name)
            if st.get("state", "pending") == "pending" and not st.get("workflow"):
                out.append(name)
        return out

    def plan(self, model_id: str) -> dict[str, dict]:
        waiting = self._waiting(model_id)
        if not waiting:
            return {}
        enabled = self.registry.enabled(model_id)
        return {n: cfg for n, cfg in enabled.items()
                if n in waiting or self._state(model_id, n).get("state") != "ready"}

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        due = [model_id for model_id, changed in self.dirty.items() if now - changed >= self.debounce]
        for model_id in due:
            del self.dirty[model_id]
        if due:
            self.reconcile(*due)
        self.follow()

    def reconcile(self, *model_ids: str) -> list[str]:
        """Start what these models' toggles ask for: the models with something to
        train go into runs of up to `batch` models each. Returns the runs submitted."""
        plans = {}
        for model_id in model_ids:
            try:
                plan = self._settle(model_id)
            except Exception:  # one model's trouble must not stop the others'
                log.exception("model %s: could not plan its training run", model_id)
                continue
            if plan:
                plans[model_id] = plan
        runs = []
        for batch in _batches(plans, self.batch):
            try:
                runs.append(self._submit(batch))
            except Exception:  # noqa: BLE001 - its models are marked failed (submit) or retried on the rescan
                log.exception("could not start the training run of %s", ", ".join(sorted(batch)))
        return runs

    def _settle(self, model_id: str) -> dict[str, dict]:
        """The model's plan, after its run still going is let go of (superseded, or
        training only what was turned off)."""
        plan = self.plan(model_id)
        current = self.running.get(model_id)
        if not current:
            return plan
        if not plan and any(self.registry.enrichments(model_id)[n]["enabled"] for n in current[1]):
            return plan  # nothing new, and what the run trains is still wanted: let it be
        why = "is superseded by a newer run" if plan else "trains only what was turned off"
        self._let_go(model_id, current[0], why)
        return plan

    def _let_go(self, model_id: str, run: str, why: str) -> None:
        """A run of this model alone is stopped. A run it shares with other models goes
        on for them: this model's branches stop by themselves (its steps check that the
        model's status still names their run, and that the enrichment is still on)."""
        del self.running[model_id]
        members = self.prefixes.get(run, {})
        members.pop(model_id, None)
        if not members:
            log.info("model %s: %s %s; stopping it", model_id, run, why)
            self.runner.stop(run)
            self.prefixes.pop(run, None)
            self._ended(model_id, run, "stopped")
        else:
            log.info("model %s: %s %s; its branches there stop, the run goes on for %d other model(s)",
                     model_id, run, why, len(members))
            metrics.TRAINING_RUNS.labels(model_id, "stopped").inc()

    def _submit(self, plans: dict[str, dict[str, dict]]) -> str:
        doc = workflow_dict(plans, self.options)
        name = doc["metadata"]["name"]
        for model_id, plan in plans.items():  # before submitting: the run's steps check this name
            for enrichment in plan:
                self.registry.set_status(model_id, enrichment, "pending", workflow=name)
        try:
            name = self.runner.submit(doc)
        except RunnerError as exc:
            for model_id, plan in plans.items():
                metrics.SUBMIT_FAILURES.labels(model_id).inc()
                for enrichment in plan:
                    self.registry.set_status(model_id, enrichment, "failed", workflow=name, step="submit",
                                             message=str(exc))
            raise
        self.prefixes[name] = task_prefixes(plans)
        for model_id, plan in plans.items():
            self.running[model_id] = (name, sorted(plan))
            metrics.TRAINING_SUBMITTED.labels(model_id).inc()
            for result in RESULTS:
                metrics.TRAINING_RUNS.labels(model_id, result)
        self.submitted.append(name)
        self.started[name] = time.monotonic()
        metrics.TRAINING_RUNNING.set(len(self.prefixes))
        log.info("submitted %s training %s", name,
                 "; ".join(f"{m}: {', '.join(sorted(p))}" for m, p in sorted(plans.items())))
        return name

    def follow(self) -> None:
        runs: dict[str, list[str]] = {}
        for model_id, (name, _) in self.running.items():
            runs.setdefault(name, []).append(model_id)
        for name, models in runs.items():
            try:
                status = self.runner.status(name)
            except RunnerError as exc:
                log.warning("cannot follow %s (%s): %s", name, ", ".join(models), exc)
                continue
            if not status.done:
                continue
            prefixes = self.prefixes.pop(name, {})
            for model_id in models:
                enrichments = self.running.pop(model_id)[1]
                # Not published by this run, and not taken over by a newer one: what failed here.
                unfinished = [e for e in enrichments if self._state(model_id, e).get("workflow") == name
                              and self._state(model_id, e).get("state") != "ready"]
                if status.phase == "Succeeded" or not unfinished:  # in a batch, another model's failure
                    self._ended(model_id, name, "succeeded")   # is not this one's
                    log.info("model %s: %s succeeded for it", model_id, name)
                    continue
                self._ended(model_id, name, status.phase.lower())
                self._failed(model_id, name, status, unfinished, prefixes.get(model_id, ""))

    def _failed(self, model_id: str, name: str, status, enrichments: list[str], prefix: str) -> None:
        mine = [step for e in enrichments for step in branch_steps(e, prefix)]
        # In a run of many models, what stopped the run may be another model's: say so.
        step, message = status.failure(mine) or ((status.failed_step, status.message) if not prefix else
                                                 (None, f"the run ended {status.phase.lower()} before this "
                                                        f"model's branches finished: {status.message}"))
        log.error("model %s: %s %s at step %s: %s", model_id, name, status.phase.lower(), step, message)
        for enrichment in enrichments:
            # Its own branch's failure if it had one; else what stopped the run before it.
            own = status.failure(branch_steps(enrichment, prefix)) or (step, message)
            self.registry.set_status(model_id, enrichment, "failed", workflow=name, step=own[0], message=own[1])

    def _ended(self, model_id: str, name: str, result: str) -> None:
        metrics.TRAINING_RUNS.labels(model_id, result).inc()
        if name not in self.prefixes:  # the run itself is over: its duration
            self._observe(name, result)
        metrics.TRAINING_RUNNING.set(len(self.prefixes))

    def _observe(self, name: str, result: str) -> None:
        started = self.started.pop(name, None)
        if started is not None:  # runs adopted from before a restart have no known start
            metrics.TRAINING_SECONDS.labels(result).observe(time.monotonic() - started)


def _batches(plans: dict[str, dict], size: int):
    """Runs of up to `size` models, keeping apart models whose workflow names would collide."""
    batch: dict[str, dict] = {}
    names: set[str] = set()
    for model_id in sorted(plans):
        name = k8s_name(model_id)
        if len(batch) >= size or name in names:
            yield batch
            batch, names = {}, set()
        batch[model_id] = plans[model_id]
        names.add(name)
    if batch:
        yield batch


def make_runner(settings: Settings):
    if settings.runner == "argo":
        return ArgoRunner(settings.argo_url, settings.argo_namespace, token=settings.argo_token,
                          verify=settings.argo_verify)
    return LocalRunner(env=settings.to_env())


def workflow_options(settings: Settings) -> WorkflowOptions:
    """The workflow's pods mount the data volume only where the registry lives on it: with
    ENRICHER_CONTROL_STORE=clickhouse they reach ClickHouse and the artifact store, no disk."""
    volume = {} if settings.control_store == "directory" else {"data_claim": None}
    return WorkflowOptions(image=settings.image, namespace=settings.argo_namespace if settings.runner == "argo"
                           else None, service_account=settings.argo_service_account,
                           retries=settings.step_retries, step_deadline=settings.step_deadline, **volume)


def run_trigger(settings: Settings, stop: threading.Event | None = None) -> None:
    """The trigger process: the control topic in, runs out, until stopped."""
    from confluent_kafka import Consumer

    stop = stop or threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ensure_topics(settings)
    if settings.trigger_metrics_port:
        # Only metrics here (no data, no control): open like the worker's /metrics.
        start_http_server(settings.trigger_metrics_port, addr=settings.http_host)
    trigger = Trigger(open_registry(settings), make_runner(settings), workflow_options(settings),
                      debounce=settings.trigger_debounce, batch=settings.trigger_batch)
    session_ms = int(settings.session_timeout * 1000)
    consumer = Consumer({**settings.kafka_config(), "group.id": f"{settings.consumer_group}-trigger",
                         "auto.offset.reset": "earliest", "enable.auto.commit": True,
                         "session.timeout.ms": session_ms, "heartbeat.interval.ms": max(session_ms // 6, 100)})
    consumer.subscribe([settings.control_topic])
    log.info("trigger ready: watching %s, runner %s", settings.control_topic, settings.runner)
    trigger.adopt()
    trigger.rescan()
    last_scan = time.monotonic()
    try:
        while not stop.is_set():
            for message in consumer.consume(100, timeout=0.2):
                if not message.error():
                    trigger.on_event(message.value())
            if time.monotonic() - last_scan > settings.trigger_rescan:
                trigger.rescan()
                last_scan = time.monotonic()
            trigger.tick()
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
