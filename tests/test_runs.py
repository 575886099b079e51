"""Training runs: the workflow's steps, executed by the local runner."""

import time

import pytest
from enricher.pipelines import steps
from enricher.pipelines.runners import LocalRunner, RunnerError, dag_order
from enricher.pipelines.workflow import WorkflowOptions, workflow_dict

from enricher import sample

from .conftest import offline_registry

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def setup(tmp_path):
    settings, registry, reference = offline_registry(tmp_path, 3000)
    registry.register("credit", sample.SCHEMA, reference)
    registry.set_enrichment("credit", "anomaly_detection", True, {"n_estimators": 20})
    runner = LocalRunner(env=settings.to_env())
    return settings, registry, runner


def test_the_local_runner_executes_the_dag_and_the_artifact_is_published(setup):
    settings, registry, runner = setup
    doc = workflow_dict({"credit": {"anomaly_detection": {"n_estimators": 20}}}, WorkflowOptions(retries=0))
    name = runner.submit(doc)
    status = runner.wait(name, timeout=240)
    assert status.phase == "Succeeded", (status.failed_step, status.message)
    assert status.steps == {"prepare": "Succeeded", "train-anomaly-detection": "Succeeded",
                            "validate-anomaly-detection": "Succeeded", "publish-anomaly-detection": "Succeeded",
                            "onExit": "Succeeded"}
    store = settings.artifacts()
    manifest = store.load("credit", "anomaly_detection").manifest
    assert manifest.workflow == name and manifest.parameters["n_estimators"] == 20
    assert manifest.training_rows == 3000
    st = registry.status("credit", "anomaly_detection")
    assert (st["state"], st["version"], st["workflow"]) == ("ready", 1, name)
    assert not (settings.artifact_dir / "_runs" / name).exists(), "the run's staging is cleaned up"


def test_a_failure_a_retry_cannot_change_is_not_retried_and_is_reported_with_its_step_and_reason(setup):
    settings, registry, runner = setup
    doc = workflow_dict({"nosuch": {"anomaly_detection": {}}}, WorkflowOptions(retries=2))
    status = runner.wait(runner.submit(doc), timeout=120)
    assert status.phase == "Failed" and status.failed_step == "prepare"
    assert status.message.startswith("exit 3 after 1 attempt(s)") and "not registered" in status.message
    assert status.attempts == {"prepare": 1, "onExit": 1}
    assert status.steps["publish-anomaly-detection"] == "Omitted"
    assert status.steps["onExit"] == "Succeeded"
    assert settings.artifacts().versions("nosuch", "anomaly_detection") == []


@pytest.mark.slow  # a fault or soak test: `make test-slow` (CI runs it)
def test_a_step_past_its_deadline_is_killed_and_retried_by_the_policy_then_reported(setup):
    settings, registry, runner = setup
    # a training that would take far longer than its deadline (a real fit, not a sleep)
    doc = workflow_dict({"credit": {"anomaly_detection": {"n_estimators": 5_000_000}}},
                        WorkflowOptions(retries=1, step_deadline=8))  # prepare alone takes ~3 s (imports)
    started = time.monotonic()
    status = runner.wait(runner.submit(doc), timeout=120)
    assert status.phase == "Failed" and status.failed_step == "train-anomaly-detection"
    assert status.message.startswith("deadline after 2 attempt(s)") and "deadline of 8s" in status.message
    assert status.attempts == {"prepare": 1, "train-anomaly-detection": 2, "onExit": 1}
    assert time.monotonic() - started >= 2 * 8 + 1, "two attempts of 8 s and a back-off between them"
    assert settings.artifacts().versions("credit", "anomaly_detection") == []


def test_a_stopped_run_ends_at_once_and_runs_nothing_after(setup):
    _, _, runner = setup
    doc = {"metadata": {"name": "slow"}, "spec": {"entrypoint": "run", "templates": [
        {"name": "sleep", "container": {"image": "x", "command": ["python3", "-c", "import time; time.sleep(60)"]}},
        {"name": "run", "dag": {"tasks": [{"name": "a", "template": "sleep"},
                                          {"name": "b", "template": "sleep", "depends": "a"}]}}]}}
    runner.submit(doc)
    time.sleep(0.5)
    started = time.monotonic()
    runner.stop("slow")
    status = runner.wait("slow", timeout=10)
    assert time.monotonic() - started < 5
    assert status.phase == "Failed" and "superseded" in status.message and status.steps["b"] == "Omitted"


def test_dag_order_puts_dependencies_first_and_refuses_cycles():
    doc = workflow_dict({"credit": {"anomaly_detection": {}}})
    assert [t["name"] for t, _ in dag_order(doc)] == ["prepare", "train-anomaly-detection",
                                                      "validate-anomaly-detection", "publish-anomaly-detection"]
    cyclic = {"spec": {"entrypoint": "run", "templates": [{"name": "run", "dag": {"tasks": [
        {"name": "a", "template": "t", "depends": "b"}, {"name": "b", "template": "t", "depends": "a"}]}}]}}
    with pytest.raises(RunnerError, match="cycle"):
        dag_order(cyclic)


def test_publish_leaves_alone_what_a_newer_run_or_a_toggle_has_taken_over(setup):
    settings, registry, _ = setup
    store = settings.artifacts()
    for run in ("run-old", "run-new"):  # as the trigger submits them: the status names the run first
        registry.set_status("credit", "anomaly_detection", "pending", workflow=run)
        steps.prepare(registry, store, "credit", run)
        steps.train(registry, store, "credit", run, "anomaly_detection", {"n_estimators": 10})
    # run-new took over: run-old must neither train again (a batch run's branch goes on) nor publish over it.
    with pytest.raises(steps.StepError, match="now trained by run-new"):
        steps.train(registry, store, "credit", "run-old", "anomaly_detection", {"n_estimators": 10})
    assert registry.status("credit", "anomaly_detection")["workflow"] == "run-new"
    assert steps.publish(registry, store, "credit", "run-old", "anomaly_detection") is None
    assert steps.publish(registry, store, "credit", "run-new", "anomaly_detection") == 1
    steps.prepare(registry, store, "credit", "run-off")
    steps.train(registry, store, "credit", "run-off", "anomaly_detection", {"n_estimators": 10})
    registry.set_enrichment("credit", "anomaly_detection", False)
    assert steps.publish(registry, store, "credit", "run-off", "anomaly_detection") is None
    assert store.versions("credit", "anomaly_detection") == [1]


def test_validation_refuses_a_staged_result_changed_after_training(setup):
    settings, registry, _ = setup
    store = settings.artifacts()
    steps.prepare(registry, store, "credit", "run-x")
    steps.train(registry, store, "credit", "run-x", "anomaly_detection", {"n_estimators": 10})
    store.files.write(store.files.path("_runs", "run-x", "credit", "anomaly_detection", "forest.npz"), b"garbage")
    with pytest.raises(steps.StepError, match="changed after training"):
        steps.validate(registry, store, "credit", "run-x", "anomaly_detection")


def test_an_explanation_surrogate_below_the_fidelity_bar_fails_validation_and_the_previous_version_serves(setup):
    settings, registry, runner = setup
    store = settings.artifacts()
    registry.set_enrichment("credit", "explainability", True, {"n_estimators": 30})
    first = runner.submit(workflow_dict({"credit": {"explainability": {"n_estimators": 30}}}, WorkflowOptions(retries=0)))
    assert runner.wait(first, timeout=240).phase == "Succeeded"
    manifest = store.load("credit", "explainability").manifest
    quality = manifest.parameters["quality"]
    assert quality["metric"] == "r2" and quality["fidelity"] >= 0.9  # recorded with the artifact
    # a bar no surrogate of 5 trees meets: the run trains, then validation refuses it, saying why
    bar = {"n_estimators": 5, "min_fidelity": 0.99}
    registry.set_enrichment("credit", "explainability", True, bar)
    name = runner.submit(workflow_dict({"credit": {"explainability": bar}}, WorkflowOptions(retries=2)))
    status = runner.wait(name, timeout=240)
    assert status.phase == "Failed" and status.failed_step == "validate-explainability"
    assert "below min_fidelity 0.99" in status.message and "held-out reference rows" in status.message
    assert store.current_version("credit", "explainability") == manifest.version  # the previous one serves


def test_a_fit_refused_for_its_inputs_is_not_retried(tmp_path):
    """Too few reference rows for the surrogate: no retry can change that (exit 3, one
    attempt, the reason in the status), where it used to be retried as a crash."""
    import pyarrow.parquet as pq

    settings, registry, _ = offline_registry(tmp_path, 3000)
    few = tmp_path / "few.parquet"
    pq.write_table(sample.reference_table(15), few)
    registry.register("tiny", sample.SCHEMA, few)
    runner = LocalRunner(env=settings.to_env())
    doc = workflow_dict({"tiny": {"explainability": {"n_estimators": 5}}}, WorkflowOptions(retries=2))
    status = runner.wait(runner.submit(doc), timeout=120)
    assert status.phase == "Failed" and status.failed_step == "train-explainability", status.message
    assert status.message.startswith("exit 3 after 1 attempt(s)") and "at least 10 to fit on" in status.message
    assert status.attempts == {"prepare": 1, "train-explainability": 1, "onExit": 1}


def test_a_stopped_run_still_runs_its_exit_handler(setup, tmp_path):
    _, _, runner = setup
    marker = tmp_path / "cleaned"
    doc = {"metadata": {"name": "slow-exit"}, "spec": {"entrypoint": "run", "onExit": "clean", "templates": [
        {"name": "sleep", "container": {"image": "x", "command": ["python3", "-c", "import time; time.sleep(60)"]}},
        {"name": "clean", "container": {"image": "x", "command": [
            "python3", "-c", f"open({str(marker)!r}, 'w').write('done')"]}},
        {"name": "run", "dag": {"tasks": [{"name": "a", "template": "sleep"}]}}]}}
    runner.submit(doc)
    time.sleep(0.5)
    runner.stop("slow-exit")
    status = runner.wait("slow-exit", timeout=20)
    assert status.phase == "Failed" and "superseded" in status.message
    assert status.steps["onExit"] == "Succeeded" and marker.read_text() == "done"


def test_training_by_hand_publishes_what_passes_and_names_what_failed(setup, capsys):
    from enricher.cli import main

    settings, registry, _ = setup
    registry.set_enrichment("credit", "explainability", True, {"n_estimators": 5, "min_fidelity": 0.99})
    code = main(["--data-dir", str(settings.data_dir), "train", "credit"])
    err = capsys.readouterr().err
    assert code == 2
    assert "failed for explainability" in err and "published: anomaly_detection" in err
    assert "below min_fidelity 0.99" in err
    store = settings.artifacts()
    assert store.current_version("credit", "anomaly_detection") == 1
    assert store.current_version("credit", "explainability") is None
    assert registry.status("credit", "anomaly_detection")["state"] == "ready"
    failed = registry.status("credit", "explainability")
    assert failed["state"] == "failed" and failed["step"] == "validate"
    assert not any((settings.artifact_dir / "_runs").glob("*")), "staging removed"


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_train_all_fits_every_model_in_one_process_and_a_broken_one_stops_no_other(tmp_path, capsys, jobs):
    """`enricher train --all`: every registered model with an enrichment on, each published as it
    finishes; one whose reference data went bad is named with its reason, the others are published."""
    from enricher.cli import main

    settings, registry, reference = offline_registry(tmp_path, 1000)
    names = [f"m{i}" for i in range(5)]
    for name in names:
        registry.register(name, sample.SCHEMA, reference)
        registry.set_enrichment(name, "anomaly_detection", True, {"n_estimators": 10})
    registry.register("idle", sample.SCHEMA, reference)  # nothing on: not a candidate
    # m3's stored reference is damaged after registration (a disk error, a bad copy)
    stored = next(p for p in settings.registry_dir.rglob("*") if p.is_file() and "m3" in str(p)
                  and p.suffix == ".parquet")
    stored.write_bytes(b"not parquet at all")
    code = main(["--data-dir", str(settings.data_dir), "train", "--all", "--jobs", jobs])
    out, err = capsys.readouterr()
    assert code == 2
    assert "trained 4 of 5 models (4 artifacts published)" in out and f"with {jobs} process(es)" in out
    assert "1 failed" in err and "  m3: " in err
    store = settings.artifacts()
    for name in names:
        assert store.current_version(name, "anomaly_detection") == (None if name == "m3" else 1), name
        assert registry.status(name, "anomaly_detection")["state"] == ("failed" if name == "m3" else "ready")
    assert store.current_version("idle", "anomaly_detection") is None
    assert "trained 5/5 models, 1 failed" in err  # the progress line (one per tenth on a non-terminal)


def test_train_names_several_models_and_refuses_what_makes_no_sense(tmp_path, capsys):
    from enricher.cli import main

    settings, registry, reference = offline_registry(tmp_path, 1000)
    for name in ("a", "b"):
        registry.register(name, sample.SCHEMA, reference)
        registry.set_enrichment(name, "anomaly_detection", True, {"n_estimators": 10})
    data = ["--data-dir", str(settings.data_dir)]
    assert main([*data, "train", "a", "b", "ghost", "--jobs", "1"]) == 2
    out, err = capsys.readouterr()
    assert "trained 2 of 3 models" in out and "  ghost: " in err and "not registered" in err.lower()
    assert settings.artifacts().current_version("b", "anomaly_detection") == 1
    assert main([*data, "train", "a", "--all"]) == 2
    assert "give model ids or --all, not both" in capsys.readouterr().err
    assert main([*data, "train"]) == 2
    assert "or --all" in capsys.readouterr().err
    assert main([*data, "train", "a", "b", "--jobs", "0"]) == 2
    assert "--jobs: at least 1" in capsys.readouterr().err
