"""The trigger: toggles become training runs, coalesced, superseded, followed."""

import time

import pytest
from enricher.pipelines.runners import LocalRunner
from enricher.pipelines.workflow import WorkflowOptions

from enricher import sample
from enricher.control.plane import ControlPlane
from enricher.control.trigger import Trigger

from .conftest import offline_registry

pytestmark = pytest.mark.timeout(300)
AD = "anomaly_detection"


@pytest.fixture
def world(tmp_path):
    settings, registry, reference = offline_registry(tmp_path, 2000)
    control = ControlPlane(registry, settings.artifacts())  # no announcements: the test ticks the trigger
    control.put_model("credit", {"schema": sample.SCHEMA, "reference": str(reference)})
    runner = LocalRunner(env=settings.to_env())
    trigger = Trigger(registry, runner, WorkflowOptions(retries=0), debounce=0.5)
    return settings, control, trigger, runner


def toggle_now(control, trigger, change: dict) -> list[str]:
    """Apply a toggle and let the trigger act on it at once (debounce already over)."""
    control.patch_enrichments("credit", {AD: change})
    trigger.notice("credit", 0.0)
    trigger.tick()
    return trigger.submitted


def settle(trigger, timeout=120):
    """Tick until nothing is waiting or running."""
    deadline = time.monotonic() + timeout
    while (trigger.dirty or trigger.running) and time.monotonic() < deadline:
        trigger.tick()
        time.sleep(0.1)
    assert not trigger.running, "runs still going"


def test_rapid_toggles_of_one_model_make_one_run(world):
    settings, control, trigger, _ = world
    for n in (10, 20, 30):  # three changes within the debounce window
        control.patch_enrichments("credit", {AD: {"enabled": True, "config": {"n_estimators": n}}})
        trigger.notice("credit")
    trigger.tick()
    assert trigger.submitted == []  # still inside the quiet period
    time.sleep(0.6)
    settle(trigger)
    assert len(trigger.submitted) == 1
    e = control.enrichments("credit")[AD]
    assert (e["status"], e["version"], e["workflow"]) == ("ready", 1, trigger.submitted[0])
    assert settings.artifacts().load("credit", AD).manifest.parameters["n_estimators"] == 30


def test_a_newer_change_supersedes_a_run_still_going(world):
    settings, control, trigger, runner = world
    [first] = toggle_now(control, trigger, {"enabled": True, "config": {"n_estimators": 10}})
    second = toggle_now(control, trigger, {"config": {"n_estimators": 40}})[-1]
    assert second != first
    assert runner.wait(first, timeout=30).message == "stopped (superseded)"
    settle(trigger)
    manifests = settings.artifacts().manifests("credit", AD)
    assert [m.workflow for m in manifests] == [second] and manifests[0].parameters["n_estimators"] == 40


def test_turning_an_enrichment_off_trains_nothing_and_stops_its_run(world):
    settings, control, trigger, runner = world
    [run] = toggle_now(control, trigger, {"enabled": True})
    toggle_now(control, trigger, {"enabled": False})
    assert trigger.submitted == [run] and "credit" not in trigger.running
    assert runner.wait(run, timeout=30).phase == "Failed"
    assert settings.artifacts().versions("credit", AD) == []
    assert control.enrichments("credit")[AD]["status"] == "disabled"


def test_a_failed_run_marks_its_enrichments_failed_with_the_step(world):
    settings, control, trigger, _ = world
    control.patch_enrichments("credit", {AD: {"enabled": True}})
    # Break the model's reference data behind the registry's back: training cannot read it.
    (settings.registry_dir / "credit" / "reference.parquet").write_bytes(b"not parquet")
    trigger.notice("credit", 0.0)
    settle(trigger)
    e = control.enrichments("credit")[AD]
    assert e["status"] == "failed" and e["step"] == "prepare" and e["message"]
    assert e["workflow"] == trigger.submitted[0]


def test_a_lost_event_is_found_by_the_rescan(world):
    _, control, trigger, _ = world
    control.patch_enrichments("credit", {AD: {"enabled": True, "config": {"n_estimators": 10}}})
    trigger.rescan()  # no notice: as if the event never arrived
    settle(trigger)
    assert control.enrichments("credit")[AD]["status"] == "ready"


def test_a_new_trigger_restarts_a_run_its_predecessor_left_unfinished(world):
    settings, control, trigger, _ = world
    [lost] = toggle_now(control, trigger, {"enabled": True, "config": {"n_estimators": 10}})
    trigger.runner.stop(lost)  # the old trigger (and its local run) went away mid-run
    successor = Trigger(trigger.registry, LocalRunner(env=settings.to_env()), WorkflowOptions(retries=0),
                        debounce=0.5)
    successor.adopt()
    settle(successor)
    e = control.enrichments("credit")[AD]
    assert e["status"] == "ready" and e["workflow"] == successor.submitted[0] != lost


def test_one_enrichment_failing_leaves_the_others_trained_and_serving(world):
    """Explanations held to a fidelity no 5-tree surrogate reaches fail validation in their
    own branch; anomaly detection, in the same run, still trains and publishes."""
    settings, control, trigger, runner = world
    control.patch_enrichments("credit", {AD: {"enabled": True, "config": {"n_estimators": 20}},
                                         "explainability": {"enabled": True,
                                                            "config": {"n_estimators": 5, "min_fidelity": 0.99}}})
    trigger.notice("credit", 0.0)
    settle(trigger, timeout=240)
    run = trigger.submitted[0]
    status = runner.status(run)
    assert status.phase == "Failed" and status.steps["publish-anomaly-detection"] == "Succeeded"
    assert status.steps["publish-explainability"] == "Omitted"
    states = control.enrichments("credit")
    assert states[AD]["status"] == "ready" and states[AD]["version"] == 1 and not states[AD]["message"]
    failed = states["explainability"]
    assert failed["status"] == "failed" and failed["step"] == "validate-explainability"
    assert "below min_fidelity 0.99" in failed["message"]
    assert settings.artifacts().current_version("credit", AD) == 1
    assert not (settings.artifact_dir / "_runs" / run).exists(), "the exit handler removed the staging"


def test_hotspots_retrain_on_their_schedule_and_on_demand_through_the_trigger(world):
    settings, control, trigger, _ = world
    control.patch_enrichments("credit", {"hotspots": {"enabled": True, "config": {"retrain_every": "1h"}}})
    trigger.notice("credit", 0.0)
    settle(trigger)
    assert control.enrichments("credit")["hotspots"]["version"] == 1
    trigger.rescan()  # not due yet: nothing happens
    assert not trigger.dirty and control.enrichments("credit")["hotspots"]["status"] == "ready"
    trigger.rescan(now=time.time() + 3601)  # an hour on: due
    assert control.enrichments("credit")["hotspots"]["status"] == "pending"
    settle(trigger)
    hotspots = control.enrichments("credit")["hotspots"]
    assert (hotspots["status"], hotspots["version"], len(trigger.submitted)) == ("ready", 2, 2)
    manifest = settings.artifacts().load("credit", "hotspots").manifest
    assert manifest.parameters["trained_on"]["reference_rows"] == 2000  # the run read the store (no rows yet)
    assert "stream_rows" in manifest.parameters["trained_on"]
    control.retrain("credit", {"enrichments": ["hotspots"]})  # on demand (what the API's POST does)
    trigger.notice("credit", 0.0)
    settle(trigger)
    assert control.enrichments("credit")["hotspots"]["version"] == 3 and len(trigger.submitted) == 3
    status = control.registry.state.root / "credit" / "status" / "hotspots.json"  # a status edited by hand
    status.write_text(status.read_text().replace(control.registry.status("credit", "hotspots")["updated_at"],
                                                 "last tuesday"))
    assert trigger.schedule("credit", now=time.time() + 7200) == []  # skipped, and the trigger goes on
    # an enrichment with no schedule is never due; retrain_every off turns the schedule off
    control.patch_enrichments("credit", {AD: {"enabled": True}, "hotspots": {"config": {"retrain_every": "off"}}})
    trigger.notice("credit", 0.0)
    settle(trigger)
    assert trigger.schedule("credit", now=time.time() + 10 * 86400) == []


# -- toggles of many models that arrive together: one run per batch ---------------------------------
@pytest.fixture
def fleet(world):
    settings, control, trigger, runner = world
    reference = settings.data_dir.parent / "reference.parquet"
    for model_id in ("loans", "churn"):
        control.put_model(model_id, {"schema": sample.SCHEMA, "reference": str(reference)})
    return settings, control, trigger, runner


def toggle_together(control, trigger, models, before_the_run=None):
    for model_id in models:
        control.patch_enrichments(model_id, {AD: {"enabled": True, "config": {"n_estimators": 10}}})
        trigger.notice(model_id, 0.0)
    if before_the_run:
        before_the_run()
    trigger.tick()


def test_toggles_of_many_models_arriving_together_make_one_run_and_each_model_publishes(fleet):
    settings, control, trigger, runner = fleet
    toggle_together(control, trigger, ["credit", "loans", "churn"])
    [run] = trigger.submitted
    assert {m: trigger.running[m][0] for m in ("credit", "loans", "churn")} == dict.fromkeys(
        ("credit", "loans", "churn"), run)
    settle(trigger, timeout=240)
    status = runner.status(run)
    assert status.phase == "Succeeded"
    assert {"credit-prepare", "loans-train-anomaly-detection", "churn-publish-anomaly-detection"} <= set(status.steps)
    for model_id in ("credit", "loans", "churn"):
        e = control.enrichments(model_id)[AD]
        assert (e["status"], e["version"], e["workflow"]) == ("ready", 1, run)
        assert settings.artifacts().load(model_id, AD).manifest.workflow == run
    assert not (settings.artifact_dir / "_runs" / run).exists(), "the exit handler removed every model's staging"


def test_in_a_batch_run_one_models_failure_is_its_own_and_the_others_publish(fleet):
    settings, control, trigger, runner = fleet
    # loans' reference data breaks behind the registry's back (after its toggle was accepted)
    toggle_together(control, trigger, ["credit", "loans", "churn"], lambda: (
        settings.registry_dir / "loans" / "reference.parquet").write_bytes(b"not parquet"))
    [run] = trigger.submitted
    settle(trigger, timeout=240)
    assert runner.status(run).phase == "Failed"
    failed = control.enrichments("loans")[AD]
    assert (failed["status"], failed["step"], failed["workflow"]) == ("failed", "loans-prepare", run)
    assert "reference data cannot be read" in failed["message"]
    for model_id in ("credit", "churn"):
        e = control.enrichments(model_id)[AD]
        assert (e["status"], e["version"], e["workflow"]) == ("ready", 1, run) and not e["message"]


def test_a_model_toggled_again_leaves_the_batch_run_which_goes_on_for_the_others(fleet):
    settings, control, trigger, runner = fleet
    toggle_together(control, trigger, ["credit", "loans"])
    [batch] = trigger.submitted
    control.patch_enrichments("credit", {AD: {"config": {"n_estimators": 40}}})
    trigger.notice("credit", 0.0)
    trigger.tick()
    newer = trigger.submitted[-1]
    assert newer != batch and trigger.running["credit"][0] == newer and trigger.running["loans"][0] == batch
    assert not runner.status(batch).done, "the batch run is not stopped: loans still trains in it"
    settle(trigger, timeout=240)
    loans = control.enrichments("loans")[AD]
    assert (loans["status"], loans["workflow"]) == ("ready", batch)
    credit = settings.artifacts().manifests("credit", AD)
    assert [m.workflow for m in credit] == [newer] and credit[0].parameters["n_estimators"] == 40
    assert control.enrichments("credit")[AD]["workflow"] == newer


def test_a_batch_holds_at_most_the_configured_number_of_models(fleet):
    settings, control, trigger, runner = fleet
    trigger.batch = 2
    toggle_together(control, trigger, ["credit", "loans", "churn"])
    assert len(trigger.submitted) == 2
    assert sorted(len([m for m, (run, _) in trigger.running.items() if run == r]) for r in trigger.submitted) == [1, 2]
    settle(trigger, timeout=240)
    assert all(control.enrichments(m)[AD]["status"] == "ready" for m in ("credit", "loans", "churn"))
