"""Generated training workflows: valid for Argo (its own JSON Schema), and
holding exactly the branches of the enrichments a model has switched on."""

import itertools
import json

import pytest
from enricher.models import ENRICHMENTS
from enricher.pipelines.workflow import WorkflowOptions, build_workflow, k8s_name, workflow_dict

COMBINATIONS = [set(c) for n in range(1, len(ENRICHMENTS) + 1) for c in itertools.combinations(sorted(ENRICHMENTS), n)]


def plan_for(names):
    return {n: ENRICHMENTS[n].check_config({}) for n in names}


@pytest.mark.parametrize("names", COMBINATIONS, ids=lambda c: "+".join(sorted(c)))
def test_every_combination_validates_against_argos_schema(validator, names):
    doc = workflow_dict({"credit_default": plan_for(names)}, WorkflowOptions(namespace="ml", service_account="enricher"))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


@pytest.mark.parametrize("names", COMBINATIONS, ids=lambda c: "+".join(sorted(c)))
def test_the_dag_holds_one_independent_branch_per_enabled_enrichment(names):
    doc = workflow_dict({"credit_default": plan_for(names)})
    dag = next(t for t in doc["spec"]["templates"] if t["name"] == doc["spec"]["entrypoint"])["dag"]
    tasks = {t["name"]: t for t in dag["tasks"]}
    slugs = {n: n.replace("_", "-") for n in names}
    assert set(tasks) == {"prepare"} | {f"{step}-{s}" for s in slugs.values()
                                        for step in ("train", "validate", "publish")}
    assert "depends" not in tasks["prepare"]
    assert dag["failFast"] is False, "one enrichment's failure must not stop the other branches"
    for name, slug in slugs.items():
        train, validate, publish = (tasks[f"{step}-{slug}"] for step in ("train", "validate", "publish"))
        assert train["depends"] == "prepare"
        assert validate["depends"] == f"train-{slug}" and publish["depends"] == f"validate-{slug}"
        params = {p["name"]: p["value"] for p in train["arguments"]["parameters"]}
        assert params["enrichment"] == name
        assert json.loads(params["config"]) == plan_for(names)[name]
        for task in (validate, publish):
            assert task["arguments"]["parameters"] == [{"name": "model", "value": "credit_default"},
                                                       {"name": "enrichment", "value": name}]
    assert doc["spec"]["onExit"] == "cleanup", "the run's staging goes however the run ends"


def test_steps_are_commands_of_this_package_with_retries_and_resources():
    doc = workflow_dict({"credit_default": plan_for(ENRICHMENTS)}, WorkflowOptions(image="reg/enricher:1.2", retries=3))
    containers = {t["name"]: t for t in doc["spec"]["templates"] if "container" in t}
    assert set(containers) == {"prepare", "train", "validate", "publish", "cleanup"}
    for name, t in containers.items():
        c = t["container"]
        assert c["image"] == "reg/enricher:1.2"
        assert c["command"] == ["enricher", "pipeline", name]
        assert "--run" in c["args"] and ("--model" in c["args"]) == (name != "cleanup")  # cleanup: the whole run
        assert t["retryStrategy"]["limit"] == 3
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert {"configMapRef": {"name": "enricher-config", "optional": True}} in c["envFrom"]
        # a directory registry: its volume, and the secret files (as k8s/base/ mounts them)
        assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]} == {
            "data": "/var/lib/enricher", "secrets": "/etc/enricher/secrets"}
        volumes = {v["name"]: v for v in t["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "enricher-data"
        assert volumes["secrets"]["secret"]["secretName"] == "enricher-secrets"
    assert containers["train"]["container"]["resources"]["requests"]["memory"] == "2Gi"
    params = {p["name"]: p["value"] for p in doc["spec"]["arguments"]["parameters"]}
    assert params == {"models": "credit_default", "plans": json.dumps({"credit_default": sorted(ENRICHMENTS)})}
    assert doc["metadata"]["labels"]["enricher.io/model"] == "credit-default"


def test_with_the_registry_in_clickhouse_the_steps_mount_no_data_volume(validator):
    from enricher.config import Settings
    from enricher.control.trigger import workflow_options

    shared = Settings.from_env(env={"ENRICHER_CONTROL_STORE": "clickhouse", "ENRICHER_RUNNER": "argo",
                                    "ENRICHER_ARGO_URL": "https://argo:2746", "ENRICHER_ARGO_NAMESPACE": "ml"},
                               data_dir="/tmp/unused")
    doc = workflow_dict({"credit_default": plan_for(ENRICHMENTS)}, workflow_options(shared))
    assert not list(validator.iter_errors(doc))
    for t in (t for t in doc["spec"]["templates"] if "container" in t):
        assert [v["name"] for v in t["volumes"]] == ["secrets"]  # the secret files only: no claim
        assert [m["name"] for m in t["container"]["volumeMounts"]] == ["secrets"]
    directory = Settings.from_env(env={}, data_dir="/tmp/unused")
    doc = workflow_dict({"credit_default": plan_for(ENRICHMENTS)}, workflow_options(directory))
    claims = [v for t in doc["spec"]["templates"] for v in t.get("volumes", []) if "persistentVolumeClaim" in v]
    assert claims and all(v["persistentVolumeClaim"]["claimName"] == "enricher-data" for v in claims)


def test_names_are_valid_kubernetes_names_even_for_long_model_ids():
    long_id = "m" + "x_" * 31
    doc = workflow_dict({long_id: plan_for(ENRICHMENTS)})
    name = doc["metadata"]["name"]
    assert len(name) <= 63 and name == name.lower() and "_" not in name
    assert k8s_name("credit_default") == "credit-default"


def test_nothing_to_train_or_an_unknown_enrichment_is_refused():
    with pytest.raises(ValueError, match="no enrichment to train"):
        build_workflow({"credit_default": {}})
    with pytest.raises(ValueError, match="unknown enrichment"):
        build_workflow({"credit_default": {"telepathy": {}}})


def test_template_names_are_unique_and_every_task_names_one():
    doc = workflow_dict({"credit_default": plan_for(ENRICHMENTS)})
    names = [t["name"] for t in doc["spec"]["templates"]]
    assert len(names) == len(set(names))
    dag = next(t for t in doc["spec"]["templates"] if t["name"] == doc["spec"]["entrypoint"])["dag"]
    assert all(task["template"] in names for task in dag["tasks"])


def test_a_batch_of_models_is_one_valid_workflow_with_each_models_graph_prefixed(validator):
    from enricher.pipelines.workflow import branch_steps, task_prefixes, trains_many

    plans = {"credit_default": plan_for(["anomaly_detection", "hotspots"]), "loans": plan_for(["anomaly_detection"])}
    doc = workflow_dict(plans, WorkflowOptions(namespace="ml"))
    assert not list(validator.iter_errors(doc))
    assert trains_many(doc["metadata"]["name"]) and not trains_many(workflow_dict({"loans": plans["loans"]})
                                                                     ["metadata"]["name"])
    dag = next(t for t in doc["spec"]["templates"] if t["name"] == doc["spec"]["entrypoint"])["dag"]
    tasks = {t["name"]: t for t in dag["tasks"]}
    prefixes = task_prefixes(plans)
    assert prefixes == {"credit_default": "credit-default-", "loans": "loans-"}
    expected = {"credit-default-prepare", "loans-prepare"} | {
        step for m, plan in plans.items() for e in plan for step in branch_steps(e, prefixes[m])}
    assert set(tasks) == expected
    for m, prefix in prefixes.items():  # each task names its model; each branch hangs off its own model's prepare
        assert {p["name"]: p["value"] for p in tasks[f"{prefix}prepare"]["arguments"]["parameters"]} == {"model": m}
        for e in plans[m]:
            train = tasks[prefix + "train-" + e.replace("_", "-")]
            assert train["depends"] == f"{prefix}prepare"
            assert {p["name"]: p["value"] for p in train["arguments"]["parameters"]}["model"] == m
    assert dag["failFast"] is False, "one model's failure must not stop the others"
    assert doc["metadata"]["annotations"]["enricher.io/model-id"] == "credit_default,loans"


def test_models_whose_workflow_names_collide_are_not_put_in_one_run():
    long = "m" + "x" * 45
    with pytest.raises(ValueError, match="separate runs"):
        build_workflow({long + "_a": plan_for(["anomaly_detection"]), long + "_b": plan_for(["anomaly_detection"])})
    from enricher.control.trigger import _batches

    plans = {long + "_a": {}, long + "_b": {}, "loans": {}}
    assert [sorted(b) for b in _batches(plans, 25)] == [["loans", long + "_a"], [long + "_b"]]
