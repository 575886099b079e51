"""The command line as a user types it."""

import json

import orjson
import pyarrow.csv as pacsv
import pytest

from enricher import sample
from enricher.cli import main


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("ENRICHER_DATA_DIR", str(tmp_path / "data"))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(sample.SCHEMA))
    reference = tmp_path / "reference.csv"
    pacsv.write_csv(sample.reference_table(500), reference)
    return schema, reference


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_register_toggle_train_and_show(files, capsys):
    schema, reference = files
    code, out, _ = run(capsys, "models", "register", "credit", "--schema", str(schema), "--reference", str(reference))
    assert code == 0 and "registered credit: binary_classification, 11 features, 1 attributes" in out
    code, out, _ = run(capsys, "enrichments", "set", "credit", "anomaly_detection=on",
                       "anomaly_detection.n_estimators=50")
    assert code == 0 and "anomaly_detection\ton\tpending\tnot trained" in out
    code, out, _ = run(capsys, "train", "credit")
    assert code == 0 and "version 1" in out
    code, out, _ = run(capsys, "models", "list")
    assert out.strip() == "credit\tbinary_classification\tenrichments: anomaly_detection"
    code, out, _ = run(capsys, "models", "show", "credit")
    shown = json.loads(out)
    assert shown["reference_rows"] == 500
    assert shown["enrichments"]["anomaly_detection"] == {"enabled": True, "config": {"n_estimators": 50},
                                                         "artifact_version": 1, "versions": [1]}
    code, out, _ = run(capsys, "enrichments", "retrain", "credit")  # back to the trigger; v1 serves meanwhile
    assert code == 0 and "anomaly_detection\ton\tpending\tartifact v1" in out
    code, out, _ = run(capsys, "enrichments", "set", "credit", "anomaly_detection=off")
    assert "anomaly_detection\toff\tdisabled\tartifact v1" in out


@pytest.mark.parametrize("argv, message", [
    (["models", "register", "Credit-Model", "--schema", "{schema}", "--reference", "{reference}"],
     "must match ^[a-z][a-z0-9_]{0,62}$"),
    (["models", "register", "m", "--schema", "/nope.json", "--reference", "{reference}"],
     "schema file '/nope.json' does not exist"),
    (["models", "show", "ghost"], "model 'ghost' is not registered"),
    (["enrichments", "set", "ghost", "anomaly_detection=on"], "model 'ghost' is not registered"),
    (["train", "ghost"], "not registered"),
    (["enrichments", "retrain", "ghost"], "model 'ghost' is not registered"),
    (["deadletters", "--reason", "bad_vibes"], "--reason 'bad_vibes': unknown; one of too_large, invalid_json"),
    (["deadletters", "--since", "yesterday"], "window 'yesterday': write a positive number and a unit"),
    (["deadletters", "--bytes", "0"], "--bytes: a positive number of bytes"),
])
def test_mistakes_get_a_message_that_says_what_to_fix(files, capsys, argv, message):
    schema, reference = files
    argv = [a.format(schema=schema, reference=reference) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err


def test_reference_that_does_not_fit_is_refused_by_column(files, capsys, tmp_path):
    schema, _ = files
    bad = tmp_path / "bad.csv"
    pacsv.write_csv(sample.reference_table(50).drop_columns(["f7"]), bad)
    code, _, err = run(capsys, "models", "register", "m", "--schema", str(schema), "--reference", str(bad))
    assert code == 2 and "reference column 'f7': missing" in err


def test_toggle_mistakes(files, capsys):
    schema, reference = files
    run(capsys, "models", "register", "m", "--schema", str(schema), "--reference", str(reference))
    assert "unknown enrichment 'no_such_one'" in run(capsys, "enrichments", "set", "m", "no_such_one=on")[2]
    assert "takes on or off" in run(capsys, "enrichments", "set", "m", "anomaly_detection=maybe")[2]
    assert "n_estimators" in run(capsys, "enrichments", "set", "m", "anomaly_detection.n_estimators=-1")[2]
    assert "no enrichment enabled" in run(capsys, "train", "m")[2]
    assert "hotspots is off for m" in run(capsys, "enrichments", "retrain", "m", "hotspots")[2]
    assert "has no enrichment on" in run(capsys, "enrichments", "retrain", "m")[2]


def test_bad_settings_in_the_environment_are_reported(files, capsys, monkeypatch):
    monkeypatch.setenv("ENRICHER_BATCH_SIZE", "lots")
    code, _, err = run(capsys, "models", "list")
    assert code == 2 and "ENRICHER_BATCH_SIZE='lots'" in err


def test_produce_sends_each_line_and_query_prints_json(files, capsys, tmp_path, broker, monkeypatch):
    monkeypatch.setenv("ENRICHER_BROKER", broker.url)
    monkeypatch.setenv("ENRICHER_INFERENCE_TOPIC", "cli-in")
    monkeypatch.setenv("ENRICHER_DLQ_TOPIC", "cli-dlq")
    schema, reference = files
    lines = tmp_path / "inferences.jsonl"
    msgs, _ = sample.inferences(25)
    lines.write_bytes(b"\n".join(msgs) + b"\n")
    # No model registered on this machine: sent, but the ids cannot be checked here; it says so.
    code, out, err = run(capsys, "produce", "--batch", "none", str(lines))
    assert code == 0 and "produced 25 lines (0 inferences, 0 label updates, 25 for models not registered in" in out
    assert "in 25 messages to cli-in" in out and "model ids and features were not checked here" in err
    from enricher.config import Settings
    from enricher.stream.topics import read_topic
    got = [m.value() for m in read_topic(Settings.from_env(), "cli-in", expected=25)]
    assert sorted(got) == sorted(msgs)

    # Registered here: label updates count as such, and what the worker will refuse is said first.
    run(capsys, "models", "register", sample.MODEL_ID, "--schema", str(schema), "--reference", str(reference))
    no_f3 = json.loads(msgs[0])
    del no_f3["features"]["f3"]
    labels = [json.dumps({"model_id": sample.MODEL_ID, "inference_id": json.loads(m)["inference_id"], "label": 1})
              for m in msgs[:5]]
    mixed = [m.decode() for m in msgs] + labels + [json.dumps(no_f3), '{"model_id": "nobody", "features": {}}',
                                                   "{not json"]
    lines.write_text("\n".join(mixed) + "\n")
    code, out, err = run(capsys, "produce", "--check", str(lines))
    assert code == 0 and "checked 33 lines (25 inferences, 5 label updates); nothing sent (--check)" in out
    assert "the worker would refuse 3" in err
    assert "missing_feature\t1\te.g. line 31: feature 'f3': missing" in err
    assert "unknown_model\t1\te.g. line 32:" in err and "invalid_json\t1\te.g. line 33:" in err
    code, out, err = run(capsys, "produce", "--batch", "none", str(lines))
    assert code == 0 and "produced 33 lines (25 inferences, 5 label updates) in 33 messages" in out
    assert "the worker will refuse 3" in err
    assert len(read_topic(Settings.from_env(), "cli-in", expected=100, timeout=5)) == 25 + 33, \
        "refused lines are sent too (the worker dead-letters them with their reason); --check sent nothing"

    two_rows = "SELECT arrayJoin([0, 1]) AS one, 'x' AS s"
    code, out, _ = run(capsys, "query", "--format", "json", two_rows)
    assert code == 0 and orjson.loads(out) == [{"one": 0, "s": "x"}, {"one": 1, "s": "x"}]  # one document
    code, out, _ = run(capsys, "query", "--format", "jsonl", two_rows)
    assert code == 0 and [orjson.loads(l) for l in out.splitlines()] == [{"one": 0, "s": "x"}, {"one": 1, "s": "x"}]
    code, out, _ = run(capsys, "query", "SELECT 1 AS one, 'x' AS s")
    assert out.splitlines()[0].split() == ["one", "s"] and out.splitlines()[2].split() == ["1", "x"]


def test_query_is_read_only(files, capsys):
    code, _, err = run(capsys, "query", "CREATE DATABASE sneaky")
    assert code == 2 and "query refused: only SELECT" in err


def test_artifacts_list_and_rollback(files, capsys, monkeypatch):
    schema, reference = files
    monkeypatch.setenv("ENRICHER_ARTIFACT_KEEP", "2")
    run(capsys, "models", "register", "credit", "--schema", str(schema), "--reference", str(reference))
    run(capsys, "enrichments", "set", "credit", "anomaly_detection=on", "anomaly_detection.n_estimators=20")
    for _ in range(3):
        assert run(capsys, "train", "credit")[0] == 0
    code, out, _ = run(capsys, "artifacts", "list", "credit")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 4  # header, rule, the two kept versions
    assert lines[2].split()[:2] == ["anomaly_detection", "v2"] and lines[3].split()[:3] == ["anomaly_detection", "v3", "*"]
    code, out, _ = run(capsys, "artifacts", "rollback", "credit", "anomaly_detection", "v2")
    assert code == 0 and "serving v2" in out
    code, out, _ = run(capsys, "enrichments", "show", "credit")
    assert "artifact v2" in out
    code, _, err = run(capsys, "artifacts", "rollback", "credit", "anomaly_detection", "1")
    assert code == 2 and "no version 1 (kept: v2, v3)" in err
    code, _, err = run(capsys, "artifacts", "rollback", "credit", "anomaly_detection", "latest")
    assert code == 2 and "give a version number" in err
    code, _, err = run(capsys, "artifacts", "list", "nosuch")
    assert code == 2 and "not registered" in err


def test_registering_again_is_a_put_enrichments_pending_announced_and_trained(make_settings, tmp_path, monkeypatch,
                                                                             capsys):
    """`models register` on a model already there does what `PUT /models/{id}` does: a
    failed enrichment goes back to pending with its old failure gone, the change is
    announced on the control topic, and the trigger plans a run for it."""
    from enricher.models.registry import ModelRegistry

    from enricher.control.trigger import Trigger
    from enricher.stream.topics import ensure_topics, read_topic

    settings = make_settings(control_topic=f"control-{tmp_path.name}")  # this test's announcements only
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    ensure_topics(settings)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(sample.SCHEMA))
    reference = tmp_path / "reference.csv"
    pacsv.write_csv(sample.reference_table(500), reference)
    assert run(capsys, "models", "register", "credit", "--schema", str(schema), "--reference", str(reference))[0] == 0
    registry = ModelRegistry(settings.registry_dir)
    registry.set_enrichment("credit", "anomaly_detection", True)
    registry.set_status("credit", "anomaly_detection", "failed", workflow="run-1", step="prepare",
                        message="its reference data cannot be read")
    code, out, _ = run(capsys, "models", "register", "credit", "--schema", str(schema), "--reference", str(reference))
    assert code == 0 and "re-registered credit" in out and "anomaly_detection (pending)" in out
    status = registry.status("credit", "anomaly_detection")
    assert status["state"] == "pending" and "message" not in status and "workflow" not in status
    events = [json.loads(m.value()) for m in read_topic(settings, settings.control_topic, expected=2, timeout=10)]
    assert [e["event"] for e in events] == ["model_registered", "model_registered"]
    assert list(Trigger(registry, runner=None).plan("credit")) == ["anomaly_detection"]


def test_every_error_the_package_raises_on_purpose_shares_one_root():
    import importlib
    import inspect

    from enricher.errors import EnricherError

    from .test_layout import every_module

    ours = []
    for name in every_module():
        module = importlib.import_module(name)
        ours += [c for _, c in inspect.getmembers(module, inspect.isclass)
                 if issubclass(c, Exception) and c.__module__ == name]
    assert len(ours) > 15
    assert [c.__name__ for c in ours if not issubclass(c, EnricherError)] == []
    assert not any(c.__name__ == "ReferenceError" for c in ours), "a builtin's name"


def test_a_bug_keeps_its_traceback_and_an_exit_code_other_than_2(files, capsys, monkeypatch):
    """Only an EnricherError is a message and exit 2; a ValueError from a bug is not swallowed as one."""
    import subprocess
    import sys

    from enricher import cli

    def broken(args):
        raise ValueError("a bug, not a user mistake")

    monkeypatch.setattr(cli, "cmd_models_list", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["models", "list"])
    code = ("import sys, enricher.cli as c\n"
            "c.cmd_models_list = lambda a: 1 / 0\n"
            "sys.exit(c.main(['models', 'list']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" in done.stderr and "ZeroDivisionError" in done.stderr


def test_sample_registers_the_sample_model_and_streams_inferences_then_labels(files, capsys, broker, monkeypatch):
    """What docker/compose.yaml's producer runs: the model registered with enrichments on,
    then inferences at a rate and the labels of a share of them, later."""
    monkeypatch.setenv("ENRICHER_BROKER", broker.url)
    monkeypatch.setenv("ENRICHER_INFERENCE_TOPIC", "cli-sample")
    code, out, _ = run(capsys, "sample", "register", "--enable", "anomaly_detection", "--enable", "hotspots")
    assert code == 0 and "registered credit_default (10,000 reference rows); turned on: anomaly_detection, hotspots" in out
    code, out, _ = run(capsys, "enrichments", "show", sample.MODEL_ID)
    states = {line.split("\t")[0]: line.split("\t")[1:3] for line in out.splitlines()}
    assert states["anomaly_detection"] == ["on", "pending"] and states["explainability"][0] == "off"
    code, out, _ = run(capsys, "sample", "stream", "--rate", "150", "--count", "300", "--label-share", "0.5",
                       "--label-delay", "0")
    assert code == 0 and "sent 300 inferences to cli-sample" in out
    from enricher.config import Settings
    from enricher.stream.topics import read_topic
    rows = [r for m in read_topic(Settings.from_env(), "cli-sample", expected=4, timeout=10)
            for r in orjson.loads(m.value())]
    inferences = [r for r in rows if "features" in r]
    labels = [r for r in rows if "features" not in r]
    assert len(inferences) == 300 and len({r["inference_id"] for r in inferences}) == 300
    assert len(labels) == 150 and {r["inference_id"] for r in labels} <= {r["inference_id"] for r in inferences}
    code, _, err = run(capsys, "sample", "stream", "--rate", "0")
    assert code == 2 and "--rate >= 1" in err
    code, _, err = run(capsys, "sample", "register", "--enable", "telepathy")
    assert code == 2 and "unknown enrichment(s) ['telepathy']" in err
