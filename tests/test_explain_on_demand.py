"""Explanations on demand, what-if and global importance, as a user of the API and the CLI meets them."""

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from enricher.models import ENRICHMENTS
from enricher.pipelines.train import train
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from enricher import sample
from enricher.cli import main
from enricher.errors import RequestError
from enricher.http.api import http_status
from enricher.http.explain import OnDemand
from enricher.stream.serving import Serving
from enricher.supervise import WorkerProcess

from .conftest import register_sample
from .test_fuzz_contract import anything
from .test_stream import produce, query

pytestmark = pytest.mark.timeout(300)
FEATURES = [f["name"] for f in sample.SCHEMA["features"]]
EX = ENRICHMENTS["explainability"]


def call(worker, method, path, body=None):
    req = urllib.request.Request(worker.url + path, method=method, headers={"Content-Type": "application/json"},
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def explained_registry(settings, tmp_path, sample_rate=0.3):
    registry = register_sample(settings, tmp_path, trained=False)
    registry.set_enrichment(sample.MODEL_ID, "explainability", True, {"n_estimators": 30, "sample_rate": sample_rate})
    train(registry, settings.artifacts(), sample.MODEL_ID, log=lambda m: None)
    return registry


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from enricher.config import Settings

    tmp = tmp_path_factory.mktemp("ondemand")
    settings = Settings.from_env(env={}, data_dir=str(tmp / "data"), broker="kafka://127.0.0.1:1")
    registry = explained_registry(settings, tmp)
    return OnDemand(settings, registry, Serving(registry, settings.artifacts()))


def test_what_if_gives_additive_attributions_and_refuses_bad_input_with_the_reason(served):
    features = {**{f: 0.5 for f in sample.NUMERIC}, "region": "west"}
    doc = served.what_if(sample.MODEL_ID, {"features": features})
    assert doc["source"] == "what_if" and doc["version"] == 1 and set(doc["attributions"]) == set(FEATURES)
    assert abs(sum(doc["attributions"].values()) + doc["base_value"] - doc["output"]) < 1e-9
    higher = served.what_if(sample.MODEL_ID, {"features": {**features, "f0": 2.5}})  # f0 raises the score
    assert higher["attributions"]["f0"] > doc["attributions"]["f0"] and higher["output"] > doc["output"]
    for body, says in [({"features": {**features, "f0": "high"}}, "f0"),
                       ({"features": {"f0": 1.0}}, "missing"),
                       ({"feature": features}, "unknown field"),
                       ("not an object", "JSON object"),
                       ({"features": {**features, "f0": 10 ** 400}}, "f0")]:
        with pytest.raises(RequestError, match=says) as err:
            served.what_if(sample.MODEL_ID, body)
        assert http_status(err.value) == 400
    with pytest.raises(RequestError) as err:
        served.what_if("nosuch", {"features": features})
    assert http_status(err.value) == 404


FUZZ = hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
valid = {**{f: 0.5 for f in sample.NUMERIC}, "region": "west"}


@FUZZ
@given(body=st.one_of(anything, st.dictionaries(st.sampled_from(["features", "attributes", "prediction", "x"]),
                                                anything, max_size=3),
                      st.fixed_dictionaries({"features": st.dictionaries(st.sampled_from(FEATURES + ["zz"]),
                                                                         anything, max_size=12)}),
                      st.builds(lambda k, v: {"features": {**valid, k: v}}, st.sampled_from(FEATURES), anything)))
def test_what_if_answers_or_refuses_anything_a_caller_sends(served, body):
    try:
        doc = served.what_if(sample.MODEL_ID, body)
    except RequestError as exc:
        assert http_status(exc) == 400 and str(exc)
        return
    assert np.isfinite(doc["output"]) and set(doc["attributions"]) == set(FEATURES)


def test_stored_and_computed_explanations_match_the_rows_and_what_if(make_settings, tmp_path, capsys):
    settings = make_settings(topic_partitions=1)
    explained_registry(settings, tmp_path, sample_rate=0.3)
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
    try:
        messages, _ = sample.inferences(2000, id_prefix="od")
        produce(settings, messages, batch="json")
        worker.wait_for(lambda s: s["enriched"] >= 2000, timeout=120)
        view = f"enricher.{sample.MODEL_ID}"
        cols = ", ".join(FEATURES)
        _, rows = query(settings, f"SELECT inference_id, {cols}, explanation_output, explanation_base_value, "
                                  f"{', '.join(f'explanation_{f}' for f in FEATURES)} FROM {view} ORDER BY inference_id")
        sampled = [r for r in rows if r[len(FEATURES) + 1] is not None]
        skipped = [r for r in rows if r[len(FEATURES) + 1] is None]
        assert 0.2 < len(sampled) / len(rows) < 0.4  # the sample rate
        for r in sampled[:3] + skipped[:3]:
            status, doc = call(worker, "GET", f"/models/{sample.MODEL_ID}/inferences/{r[0]}/explanation")
            assert status == 200 and doc["inference_id"] == r[0] and doc["version"] == 1
            status, what_if = call(worker, "POST", f"/models/{sample.MODEL_ID}/what_if",
                                   {"features": dict(zip(FEATURES, r[1:len(FEATURES) + 1]))})
            assert status == 200
            for name in FEATURES:  # on demand, what-if and the stored row agree
                assert abs(doc["attributions"][name] - what_if["attributions"][name]) < 1e-9
            if r in sampled:
                assert doc["source"] == "stored"
                stored = dict(zip(FEATURES, r[len(FEATURES) + 3:]))
                assert all(abs(doc["attributions"][f] - stored[f]) < 1e-9 for f in FEATURES)
                assert abs(doc["output"] - r[len(FEATURES) + 1]) < 1e-9
            else:
                assert doc["source"] == "computed"
        assert call(worker, "GET", f"/models/{sample.MODEL_ID}/inferences/nope/explanation")[0] == 404
        assert call(worker, "POST", f"/models/{sample.MODEL_ID}/what_if", {"features": {"f0": "x"}})[0] == 400

        # global importance through the running worker: the features that make the score come first
        png = tmp_path / "importance.png"
        code = main(["--data-dir", str(settings.data_dir), "explain", sample.MODEL_ID, "--window", "3650d",
                     "--plot", str(png)])
        out = capsys.readouterr().out
        assert code == 0, out
        lines = [line.split()[0] for line in out.splitlines()[3:] if line.strip()]
        assert set(lines[:2]) == {"f0", "f3"}, out
        assert f"{len(sampled):,} explained rows" in out and "in the score's own units (probability)" in out
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        code = main(["--data-dir", str(settings.data_dir), "explain", sample.MODEL_ID, "--window", "soon"])
        assert code != 0 and "window 'soon'" in capsys.readouterr().err
        # the same report from the API, as a window report: same figures, errors naming the field
        status, doc = call(worker, "GET", f"/models/{sample.MODEL_ID}/importance?window=3650d")
        assert status == 200 and doc["rows"] == len(sampled) and doc["model_id"] == sample.MODEL_ID
        assert {f["feature"] for f in doc["features"][:2]} == {"f0", "f3"}
        assert call(worker, "GET", f"/models/{sample.MODEL_ID}/importance?window=soon")[1]["field"] == "window"
        assert call(worker, "GET", f"/models/{sample.MODEL_ID}/importance?feature=f0")[1]["field"] == "feature"
        assert call(worker, "GET", "/models/nobody/importance")[0] == 404
    finally:
        worker.stop()


def test_on_demand_says_what_to_do_when_explanations_are_off(tmp_path):
    from enricher.config import Settings

    settings = Settings.from_env(env={}, data_dir=str(tmp_path / "data"), broker="kafka://127.0.0.1:1")
    registry = register_sample(settings, tmp_path, trained=False)
    on_demand = OnDemand(settings, registry, Serving(registry, settings.artifacts()))
    with pytest.raises(RequestError, match="explainability is not serving") as err:
        on_demand.what_if(sample.MODEL_ID, {"features": valid})
    assert http_status(err.value) == 409


def test_importance_of_a_multiclass_model_has_one_panel_per_predicted_class_and_names_its_unit(tmp_path, capsys):
    """Each row's attributions explain the class predicted on it, so a multiclass model's
    importance is given per class (in the CLI, the JSON and the chart), in log-odds."""
    import json

    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq
    from enricher.models.registry import ModelRegistry
    from enricher.pipelines.train import train

    from enricher.cli import main
    from enricher.config import Settings
    from enricher.store.sink import ClickHouseSink
    from enricher.stream.batch import BatchProcessor, Messages

    settings = Settings.from_env(env={}, data_dir=str(tmp_path / "data"), broker="kafka://127.0.0.1:1")
    schema = {**sample.SCHEMA, "task": "multiclass_classification"}
    reference = sample.reference_table(3000)
    names = np.array(["low", "mid", "high"])

    def classes_of(score):
        return names[np.digitize(score, [0.4, 0.6])]

    p = reference.column("prediction").to_numpy()
    reference = reference.set_column(reference.column_names.index("prediction"), "prediction",
                                     pa.array(classes_of(p))).drop_columns(["label"])
    pq.write_table(reference, tmp_path / "ref.parquet")
    registry = ModelRegistry(settings.registry_dir)
    registry.register("tiers", schema, tmp_path / "ref.parquet")
    registry.set_enrichment("tiers", "explainability", True, {"n_estimators": 30})
    train(registry, settings.artifacts(), "tiers", log=lambda _: None)
    messages = []
    for m in sample.inferences(900, model_id="tiers", id_prefix="t")[0]:
        doc = json.loads(m)
        doc["prediction"] = str(classes_of(np.array([doc["prediction"]]))[0])
        doc.pop("label", None)
        messages.append(orjson.dumps(doc))
    processor = BatchProcessor(settings, Serving(registry, settings.artifacts()), ClickHouseSink(settings))
    processor.handle(Messages(messages, [0] * len(messages), list(range(len(messages)))))
    processor.sink.tables.client.close()
    expected = {c: sum(1 for m in messages if json.loads(m)["prediction"] == c) for c in names}

    png = tmp_path / "tiers.png"
    code = main(["--data-dir", str(settings.data_dir), "explain", "tiers", "--window", "1d", "--format", "json",
                 "--plot", str(png)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["unit"] == "the log-odds (margin) of the class the model predicted on the row"
    assert {c["class"]: c["rows"] for c in report["classes"]} == {c: n for c, n in expected.items() if n}
    assert sum(c["rows"] for c in report["classes"]) == report["rows"] == 900
    for c in report["classes"]:
        assert {f["feature"] for f in c["features"]} == set(sample.NUMERIC + ["region"])
        assert c["features"][0]["mean_abs"] >= c["features"][-1]["mean_abs"]
    from PIL import Image

    with Image.open(png) as image:  # three panels side by side: wider than one panel's 6.5 in at 110 dpi
        assert image.size[0] > 3 * 6 * 110
    code = main(["--data-dir", str(settings.data_dir), "explain", "tiers", "--window", "1d"])
    out = capsys.readouterr().out
    assert code == 0 and "in the log-odds (margin) of the class the model predicted" in out
    assert all(f"predicted class {c}: {n:,} rows" in out for c, n in expected.items() if n)
