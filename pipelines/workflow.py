"""One Argo Workflow per training run, built with hera for exactly the
enrichments a model has switched on; or for a batch of models at once (the
trigger puts the toggles that arrive together into one run).

    prepare ─┬─> train-<a> ──> validate-<a> ──> publish-<a>
             └─> train-<b> ──> validate-<b> ──> publish-<b>     (one branch per enrichment)
    on exit: cleanup

A batch holds that graph once per model, side by side in one DAG, each
model's tasks prefixed with its name (`credit-prepare`, `credit-train-...`)
and naming the model as an input, so one template per step serves them all.

Every step is a command of this package (`enricher pipeline STEP ...`), run
by the same container image as the worker, reading and writing the artifact
store: `prepare` stages the model's reference data under the run's folder
(`_runs/<run>/<model>/`),
each `train-*` fits one enrichment on it and stages the result, `validate-*`
loads it through the same code the workers use and checks what it produces
on the reference data, and `publish-*` makes it the current version and
announces it. The branches are independent (the DAG does not fail fast): a
model whose preparation fails, or an enrichment whose training or
validation fails, publishes nothing, its current
version keeps serving, and the other branches still train and publish. The
run then ends Failed, naming the step. `cleanup`, the workflow's exit
handler, removes the run's staging however the run ended (Argo runs exit
handlers on failure and on `stop`).

The same Workflow document goes to an Argo Server (runners.ArgoRunner) or is
executed step by step on this machine (runners.LocalRunner).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field

from enricher.models import ENRICHMENTS
from hera.workflows import (
    DAG,
    ConfigMapEnvFrom,
    Container,
    Env,
    ExistingVolume,
    Parameter,
    Resources,
    RetryStrategy,
    SecretVolume,
    Workflow,
)

from enricher.errors import InvalidArgument

STEP_RETRIES = 2
STEP_DEADLINE = 3600  # seconds one attempt of a step may take (activeDeadlineSeconds)
# `enricher pipeline` exits with this code when a step failed for a reason a
# retry will not change (a model not registered, reference data missing or
# malformed, a result that fails validation): the retry strategy skips those.
EXIT_PERMANENT = 3
RETRY_EXPRESSION = f"asInt(lastRetry.exitCode) != {EXIT_PERMANENT}"
LABEL_MODEL = "enricher.io/model"
LABEL_RUN = "enricher.io/run"
ANNOTATION_MODEL = "enricher.io/model-id"
ANNOTATION_ENRICHMENTS = "enricher.io/enrichments"


@dataclass
class WorkflowOptions:
    """How the generated steps run on a cluster (ignored by the local runner
    where it does not apply)."""

    image: str = "inference-enricher:latest"
    namespace: str | None = None
    service_account: str | None = None
    env_config_map: str | None = "enricher-config"   # ENRICHER_* for the steps, as the worker gets them
    secrets: str | None = "enricher-secrets"         # mounted where the config's *_FILE settings point
    secrets_path: str = "/etc/enricher/secrets"
    data_claim: str | None = "enricher-data"         # the registry (ENRICHER_DATA_DIR), shared with the workers
    data_path: str = "/var/lib/enricher"
    step_cpu: str = "250m"
    step_memory: str = "512Mi"
    train_cpu: str = "1"
    train_memory: str = "2Gi"
    retries: int = STEP_RETRIES
    step_deadline: int = STEP_DEADLINE
    extra_env: dict[str, str] = field(default_factory=dict)


def k8s_name(model_id: str) -> str:
    """A model id as a DNS-1123 label fragment (ids are [a-z][a-z0-9_]*)."""
    return re.sub(r"[^a-z0-9-]", "-", model_id.lower()).strip("-")[:40] or "model"


def task_prefixes(models) -> dict[str, str]:
    """What each model's tasks are prefixed with in a run: nothing when the run
    trains one model; the model's name when it trains several (one DAG holds
    them all). Raises InvalidArgument when two ids make the same name (they
    share their first 40 characters): such models go to different runs."""
    models = sorted(models)
    if len(models) == 1:
        return {models[0]: ""}
    prefixes = {m: f"{k8s_name(m)}-" for m in models}
    if len(set(prefixes.values())) < len(models):
        raise InvalidArgument(f"models {models} do not all have distinct workflow names: train them in separate runs")
    return prefixes


def run_id(plans: dict[str, dict], now: float | None = None) -> str:
    """A run's name: its model (or how many models it trains), then a short digest of what and when."""
    digest = hashlib.sha256(json.dumps([plans, now or time.time()], sort_keys=True).encode()).hexdigest()[:8]
    if len(plans) == 1:
        return f"enrich-{k8s_name(next(iter(plans)))}-{digest}"
    return f"enrich-{len(plans)}-models-{digest}"


def trains_many(run: str) -> bool:
    """Whether a run (by its name, from run_id) trains a batch of models: its tasks are then prefixed."""
    return re.fullmatch(r"enrich-\d+-models-[0-9a-f]{8}", run) is not None


def build_workflow(plans: dict[str, dict[str, dict]], options: WorkflowOptions | None = None,
                   name: str | None = None) -> Workflow:
    """The training workflow for `plans`: {model_id: {enrichment: config}}, the
    enabled enrichments to train of one model, or of a batch of models (the
    trigger's toggles that arrive together). Raises InvalidArgument (a
    ValueError) for nothing to train or an unknown enrichment."""
    if not plans:
        raise InvalidArgument("no model to train")
    for model_id, plan in plans.items():
        if not plan:
            raise InvalidArgument(f"model {model_id!r}: no enrichment to train")
        unknown = sorted(set(plan) - set(ENRICHMENTS))
        if unknown:
            raise InvalidArgument(f"unknown enrichment(s) {unknown}; known: {sorted(ENRICHMENTS)}")
    prefixes = task_prefixes(plans)
    options = options or WorkflowOptions()
    name = name or run_id(plans)
    models = sorted(plans)
    env = [Env(name=k, value=v) for k, v in sorted(options.extra_env.items())]
    env_from = [ConfigMapEnvFrom(name=options.env_config_map, optional=True)] if options.env_config_map else []
    volumes = []  # the secret files, as the Deployments mount them (k8s/base/); the claim only with a directory registry
    if options.data_claim:
        volumes.append(ExistingVolume(name="data", claim_name=options.data_claim, mount_path=options.data_path))
    if options.secrets:
        volumes.append(SecretVolume(name="secrets", secret_name=options.secrets, mount_path=options.secrets_path,
                                    read_only=True))

    def step(template: str, args: list[str], inputs: list[str], cpu: str, memory: str) -> Container:
        return Container(
            name=template,
            image=options.image,
            command=["enricher", "pipeline", template],
            args=args,
            inputs=[Parameter(name=p) for p in inputs],
            env=env or None,
            env_from=env_from or None,
            volumes=volumes or None,
            resources=Resources(cpu_request=cpu, memory_request=memory),
            # Retried on anything but a permanent failure (exit EXIT_PERMANENT), a hang included:
            # an attempt past its deadline is killed and counts as failed.
            retry_strategy=RetryStrategy(limit=options.retries, retry_policy="Always",
                                         expression=RETRY_EXPRESSION),
            active_deadline_seconds=options.step_deadline,
        )

    # Each task names its model (an input): one template per step serves every model of a batch.
    common = ["--model", "{{inputs.parameters.model}}", "--run", "{{workflow.name}}"]
    labels = {LABEL_RUN: name, "app.kubernetes.io/name": "inference-enricher"}
    if len(models) == 1:
        labels[LABEL_MODEL] = k8s_name(models[0])
    with Workflow(
        name=name,
        namespace=options.namespace,
        entrypoint="run",
        service_account_name=options.service_account,
        labels=labels,
        annotations={ANNOTATION_MODEL: ",".join(models),
                     ANNOTATION_ENRICHMENTS: json.dumps({m: sorted(plans[m]) for m in models})},
        arguments=[Parameter(name="models", value=",".join(models)),
                   Parameter(name="plans", value=json.dumps({m: sorted(plans[m]) for m in models}))],
        on_exit="cleanup",
    ) as workflow:
        prepare = step("prepare", common, ["model"], options.step_cpu, options.step_memory)
        train = step("train", [*common, "--enrichment", "{{inputs.parameters.enrichment}}",
                               "--config", "{{inputs.parameters.config}}"],
                     ["model", "enrichment", "config"], options.train_cpu, options.train_memory)
        one = [*common, "--enrichment", "{{inputs.parameters.enrichment}}"]
        validate = step("validate", one, ["model", "enrichment"], options.step_cpu, options.step_memory)
        publish = step("publish", one, ["model", "enrichment"], options.step_cpu, options.step_memory)
        step("cleanup", ["--run", "{{workflow.name}}"], [], options.step_cpu, options.step_memory)
        # fail_fast off: one enrichment's (or one model's) failure must not stop the other branches.
        with DAG(name="run", fail_fast=False):
            for m in models:
                prefix = prefixes[m]
                first = prepare(name=f"{prefix}prepare", arguments={"model": m})
                for e in sorted(plans[m]):
                    trained = train(name=prefix + task_name("train", e),
                                    arguments={"model": m, "enrichment": e,
                                               "config": json.dumps(plans[m][e], sort_keys=True)})
                    checked = validate(name=prefix + task_name("validate", e), arguments={"model": m, "enrichment": e})
                    published = publish(name=prefix + task_name("publish", e), arguments={"model": m, "enrichment": e})
                    first >> trained >> checked >> published
    return workflow


def task_name(step: str, enrichment: str) -> str:
    """The DAG task of `step` in `enrichment`'s branch (e.g. validate-anomaly-detection)."""
    return f"{step}-{enrichment.replace('_', '-')}"


def branch_steps(enrichment: str, prefix: str = "") -> list[str]:
    """The tasks whose failure is `enrichment`'s own, in the order they run: its
    model's prepare (`prefix`: the model's, from task_prefixes), then its branch."""
    return [f"{prefix}prepare"] + [prefix + task_name(s, enrichment) for s in ("train", "validate", "publish")]


def workflow_dict(plans: dict[str, dict[str, dict]], options: WorkflowOptions | None = None,
                  name: str | None = None) -> dict:
    return build_workflow(plans, options, name).to_dict()
