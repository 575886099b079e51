"""Window reports have one shape: each is a CLI command and an API route, and each runs
on the store the same way straight from the CLI as through a running worker
(the worker path is in tests/test_drift.py and tests/test_explain_on_demand.py)."""

import json

import pytest

from enricher import sample
from enricher.cli import build_parser, main
from enricher.errors import InvalidArgument, NotFound
from enricher.store.reports import REPORTS, ReportStore

from .conftest import register_sample
from .test_drift import shifted, store  # noqa: F401 - a fixture


def test_every_report_is_a_command_with_its_options_and_a_module_that_measures_and_prints_it():
    parser = build_parser()
    for report in REPORTS.values():
        args = parser.parse_args([report.command, "m", "--window", "2h", "--end", "0"]
                                 + [a for name, _ in report.options for a in (f"--{name}", "x")])
        assert args.report == report.name and args.window == "2h" and args.end == "0"
        module = report.module()
        assert callable(module.measure) and callable(module.text)
        assert callable(getattr(module, "plot", None)) == report.plots
        assert callable(getattr(module, "export", None)) == report.exports == callable(getattr(module, "unexport", None))


def test_a_report_from_the_cli_without_a_worker_reads_the_store_and_names_what_is_wrong(store, capsys):  # noqa: F811
    send, drift, registry, client = store
    send(shifted(300, seed=3, shift=2.0))
    data_dir = registry.state.root.parent
    client.close()  # chDB: the CLI opens the store itself, as a user's shell would
    assert main(["--data-dir", str(data_dir), "drift", sample.MODEL_ID, "--window", "1h", "--feature", "f0",
                 "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [f["feature"] for f in doc["features"]] == ["f0"] and doc["features"][0]["rows"] == 300
    assert doc["features"][0]["psi"] > 1.0 and doc["model_id"] == sample.MODEL_ID
    assert main(["--data-dir", str(data_dir), "explain", sample.MODEL_ID, "--window", "1h"]) == 0
    assert "0 explained rows" in capsys.readouterr().out  # explanations are off for this model
    assert main(["--data-dir", str(data_dir), "drift", sample.MODEL_ID, "--window", "1y"]) == 2
    assert "window '1y'" in capsys.readouterr().err
    assert main(["--data-dir", str(data_dir), "drift", "nobody"]) == 2
    assert "nobody" in capsys.readouterr().err


def test_the_report_store_names_the_field_at_fault(tmp_path):
    from enricher.config import Settings

    settings = Settings.from_env(env={}, data_dir=str(tmp_path / "data"), broker="kafka://127.0.0.1:1")
    registry = register_sample(settings, tmp_path, enable=False, trained=False, rows=500)
    reports = ReportStore(settings, registry)
    try:
        for kwargs, field in [({"window": "soon"}, "window"), ({"end": "yesterday"}, "end"),
                              ({"options": {"feature": "nope"}}, "feature"), ({"options": {"colour": "x"}}, "colour")]:
            with pytest.raises(InvalidArgument) as err:
                reports.run(REPORTS["drift"], sample.MODEL_ID, **kwargs)
            assert err.value.field == field, kwargs
        with pytest.raises(InvalidArgument) as err:
            reports.run(REPORTS["importance"], sample.MODEL_ID, options={"feature": "f0"})
        assert err.value.field == "feature" and "use window, end" in str(err.value)
        with pytest.raises(NotFound):
            reports.run(REPORTS["drift"], "../etc")
        doc = reports.run(REPORTS["drift"], sample.MODEL_ID, "1h", "2026-01-01T00:00:00Z")
        assert doc["end"].startswith("2026-01-01T00:00:00") and doc["start"].startswith("2025-12-31T23:00:00")
        assert {f["rows"] for f in doc["features"]} == {0}
    finally:
        reports.close()
