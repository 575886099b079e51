"""Bias mitigation as a user meets it: the toggle's refusals, the curves and the choice of a
point from the CLI and the API, the columns on a running worker's rows."""

import json

import pyarrow.parquet as pq
from enricher.pipelines.train import train

from enricher import sample
from enricher.cli import main
from enricher.control.plane import ControlPlane
from enricher.errors import RequestError
from enricher.store.query import query
from enricher.supervise import WorkerProcess

from .conftest import register_sample
from .test_explain_on_demand import call
from .test_stream import produce


def bias_trained(settings, tmp_path, **config):
    registry = register_sample(settings, tmp_path, enable=False, trained=False, rows=3000)
    registry.set_enrichment(sample.MODEL_ID, "bias_mitigation", True, config)
    train(registry, settings.artifacts(), sample.MODEL_ID, log=lambda m: None)
    return registry


def test_the_toggle_is_refused_with_the_reason(make_settings, tmp_path):
    settings = make_settings()
    registry = register_sample(settings, tmp_path, enable=False, trained=False, rows=500)
    plane = ControlPlane(registry, settings.artifacts())
    no_labels = tmp_path / "nolabel.parquet"
    pq.write_table(sample.reference_table(500).drop_columns(["label"]), no_labels)
    registry.register("unlabelled", sample.SCHEMA, no_labels)
    registry.register("prices", dict(sample.SCHEMA, task="regression"), tmp_path / f"reference-{sample.MODEL_ID}.parquet")
    for model_id, reason in (("unlabelled", "no label column"), ("prices", "binary classifier")):
        try:
            plane.patch_enrichments(model_id, {"bias_mitigation": {"enabled": True}})
        except RequestError as exc:
            assert reason in str(exc)
        else:
            raise AssertionError(f"{model_id}: bias mitigation switched on")
    code = main(["--data-dir", str(settings.data_dir), "enrichments", "set", "prices", "bias_mitigation=on"])
    assert code == 2


def test_the_cli_prints_and_draws_the_curves_and_choosing_a_point_publishes_a_version(make_settings, tmp_path, capsys):
    settings = make_settings()
    bias_trained(settings, tmp_path, max_gap=0.05)
    args = ["--data-dir", str(settings.data_dir), "bias"]
    png = tmp_path / "curve.png"
    assert main(args + ["curve", sample.MODEL_ID, "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "equal_opportunity" in out and "demographic_parity" in out and "* " in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(args + ["curve", sample.MODEL_ID, "--constraint", "demographic_parity", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc["curves"]) == ["demographic_parity"] and len(doc["curves"]["demographic_parity"]) >= 100
    assert doc["version"] == 1 and doc["chosen"]["constraint"] == "equal_opportunity"
    assert main(args + ["choose", sample.MODEL_ID, "--constraint", "demographic_parity", "--index", "0"]) == 0
    assert "v2 serves demographic_parity point 0" in capsys.readouterr().out
    assert main(args + ["choose", sample.MODEL_ID, "--index", "999"]) == 2
    assert "index 999" in capsys.readouterr().err


def test_a_running_worker_writes_the_decision_and_its_version_and_switches_point_on_the_api(make_settings, tmp_path):
    settings = make_settings(topic_partitions=1)
    bias_trained(settings, tmp_path)
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()

    try:
        produce(settings, sample.inferences(500, id_prefix="b1")[0], batch="json")
        worker.wait_for(lambda s: s["enriched"] >= 500, timeout=120)
        _, rows = query(settings, f"SELECT bias_mitigated_prediction, bias_mitigation_version, sex "
                                  f"FROM enricher.{sample.MODEL_ID}")
        assert {r[1] for r in rows} == {1} and {r[0] for r in rows} == {0, 1}
        status, curves = call(worker, "GET", f"/models/{sample.MODEL_ID}/bias/curves?constraint=equalized_odds")
        assert status == 200 and list(curves["curves"]) == ["equalized_odds"]
        assert call(worker, "GET", f"/models/{sample.MODEL_ID}/bias/curves?constraint=nope")[1]["field"] == "constraint"
        status, chosen = call(worker, "PUT", f"/models/{sample.MODEL_ID}/bias/choice",
                              {"constraint": "equalized_odds", "index": 0})
        assert status == 200 and chosen["version"] == 2
        assert call(worker, "PUT", f"/models/{sample.MODEL_ID}/bias/choice", {"index": -1})[0] == 400
        produce(settings, sample.inferences(300, id_prefix="b2")[0], batch="json")
        worker.wait_for(lambda s: s["enriched"] >= 800, timeout=120)
        _, rows = query(settings, f"SELECT bias_mitigation_version, count() FROM enricher.{sample.MODEL_ID} "
                                  "WHERE inference_id LIKE 'b2-%' GROUP BY 1")
        assert [tuple(r) for r in rows] == [(2, 300)]
    finally:
        worker.stop()
