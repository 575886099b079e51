"""Drift in SQL (enricher/store/drift.py) against NumPy/SciPy on the same bins."""

import json
import time

import numpy as np
import orjson
import pytest
from enricher.models.artifact import ArtifactStore
from enricher.models.profile import MAX_CATEGORIES, profile
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from enricher import sample
from enricher.config import Settings
from enricher.store.drift import SMOOTHING, Drift
from enricher.store.sink import ClickHouseSink
from enricher.stream.batch import BatchProcessor, Messages
from enricher.stream.serving import Serving
from enricher.windows import parse_window
from tests.conftest import register_sample

VIEW = f"enricher.{sample.MODEL_ID}"


@pytest.fixture
def store(tmp_path):
    settings = Settings.from_env(env={}, data_dir=str(tmp_path / "data"), broker="kafka://127.0.0.1:1")
    registry = register_sample(settings, tmp_path, enable=False, trained=False, rows=5000)
    processor = BatchProcessor(settings, Serving(registry, ArtifactStore(settings.artifact_dir)),
                               ClickHouseSink(settings))
    offsets = iter(range(10**9))

    def send(messages):
        processor.handle(Messages(messages, [0] * len(messages), [next(offsets) for _ in messages]))

    yield send, Drift(processor.sink.tables, registry, bins=10), registry, processor.sink.tables.client
    processor.sink.tables.client.close()


def shifted(n, seed, shift=0.0, start_ms=None, new_region=None):
    """Inferences drawn like the reference, f0 moved by `shift`."""
    out = []
    start_ms = int(time.time() * 1000) - 600_000 if start_ms is None else start_ms  # all in the last hour
    for m in sample.inferences(n, seed=seed, id_prefix=f"s{seed}", start_ms=start_ms)[0]:
        doc = json.loads(m)
        doc["features"]["f0"] += shift
        if new_region and int(doc["inference_id"][-3:]) % 5 == 0:
            doc["features"]["region"] = new_region
        out.append(orjson.dumps(doc))
    return out


def numpy_drift(ref_counts, cur_counts):
    p = (ref_counts + SMOOTHING) / (ref_counts.sum() + SMOOTHING * len(ref_counts))
    q = (cur_counts + SMOOTHING) / (cur_counts.sum() + SMOOTHING * len(cur_counts))
    return {"psi": float(np.sum((q - p) * np.log(q / p))), "kl": float(np.sum(q * np.log(q / p))),
            "js": float(jensenshannon(q, p) ** 2), "hellinger": float(np.sqrt(0.5 * np.sum((np.sqrt(q) - np.sqrt(p)) ** 2)))}


def test_psi_is_near_zero_for_data_like_the_reference_and_large_for_a_shifted_feature(store):
    send, drift, *_ = store
    send(shifted(4000, seed=21))
    same = {f.feature: f for f in drift.measure(sample.MODEL_ID, parse_window("1h")).features}
    assert same["f0"].rows == 4000 and same["f0"].reference_rows == 5000
    assert all(f.psi < 0.02 for f in same.values()), {k: f.psi for k, f in same.items()}
    assert same["f0"].ks < 0.05 and same["region"].ks is None
    send(shifted(4000, seed=22, shift=2.0, start_ms=int(time.time() * 1000) - 150 * 60_000))
    moved = drift.measure(sample.MODEL_ID, 3600, feature="f0", end=time.time() - 2 * 3600)
    [f0] = moved.features
    assert f0.rows == 4000 and f0.psi > 1.0 and f0.ks > 0.5 and f0.hellinger > 0.4


def test_every_metric_equals_numpy_and_scipy_on_the_same_bins(store):
    send, drift, registry, client = store
    send(shifted(3000, seed=23, shift=0.4, new_region="atlantis"))
    report = drift.measure(sample.MODEL_ID, 3600)
    reference = registry.reference(sample.MODEL_ID)
    profiles = {p.feature: p for p in profile(registry.get(sample.MODEL_ID), reference, bins=10)}
    checked = 0
    for f in report.features:
        window = [r[0] for r in client.query(f"SELECT `{f.feature}` FROM {VIEW} WHERE `{f.feature}` IS NOT NULL"
                                             ).result_rows]
        p = profiles[f.feature]
        if f.kind == "numeric":
            cur = np.bincount(np.searchsorted(p.edges, window, side="right"), minlength=len(p.counts))
            assert abs(f.ks - ks_2samp(p.values, window).statistic) < 1e-9
        else:
            index = {c: i for i, c in enumerate(p.categories)}
            cur = np.bincount([index.get(v, len(p.categories)) for v in window], minlength=len(p.counts))
        expected = numpy_drift(p.counts.astype(float), cur.astype(float))
        for metric, value in expected.items():
            assert abs(getattr(f, metric) - value) < 1e-9, (f.feature, metric, getattr(f, metric), value)
        checked += 1
    assert checked == 12  # 10 numeric features, region, sex
    region = next(f for f in report.features if f.feature == "region")
    assert region.psi > 0.1, "an unseen category is counted (in the 'other' bin)"
    assert len(profiles["region"].categories) == 4 <= MAX_CATEGORIES


def test_an_empty_window_and_a_wrong_request_say_so(store):
    send, drift, *_ = store
    send(shifted(100, seed=24))
    empty = drift.measure(sample.MODEL_ID, 60, feature="f1", end=time.time() - 7200)
    assert [(f.rows, f.psi, f.ks) for f in empty.features] == [(0, None, None)]
    with pytest.raises(ValueError, match="no feature or attribute 'nope'"):
        drift.measure(sample.MODEL_ID, 60, feature="nope")
    for bad in ("", "1", "h", "-1h", "0m", "1y", "1h; DROP"):
        with pytest.raises(ValueError, match="e.g. 30m, 1h, 7d"):
            parse_window(bad)
    assert parse_window("90s") == 90 and parse_window("1.5h") == 5400 and parse_window("2w") == 1209600


def test_reference_histograms_live_in_clickhouse_once_per_reference(store):
    send, drift, registry, client = store
    send(shifted(10, seed=25))
    drift.measure(sample.MODEL_ID, 3600)
    again = Drift(drift.tables, registry, bins=10)
    again.measure(sample.MODEL_ID, 3600)
    rows = client.query("SELECT feature, count(), sum(count) FROM enricher_store.reference_bins FINAL "
                        "GROUP BY feature ORDER BY feature").result_rows
    assert [r[0] for r in rows] == sorted(sample.NUMERIC + ["region", "sex"])
    assert all(r[2] == 5000 for r in rows)  # every reference row in one bin of each feature
    assert dict((r[0], r[1]) for r in rows)["f3"] == 10 and dict((r[0], r[1]) for r in rows)["region"] == 5
    values = client.query("SELECT count() FROM enricher_store.reference_values").result_rows[0][0]
    assert values == 5000 * 10  # written once, though measured twice by two Drift objects


@pytest.mark.timeout(300)
def test_drift_through_the_worker_api_the_cli_and_its_gauges(make_settings, tmp_path, capsys):
    """GET /models/{id}/drift, `enricher drift` (through the worker holding the store) and the
    exported gauges, on one running worker."""
    import signal
    import urllib.error
    import urllib.request

    from enricher.cli import main
    from enricher.supervise import WorkerProcess
    from tests.test_stream import produce

    settings = make_settings(drift_interval=1.0, drift_window="2h")
    register_sample(settings, tmp_path, enable=False, trained=False, rows=5000)
    produce(settings, shifted(2000, seed=26, shift=3.0), batch="json")
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()

    def get(path):
        try:
            with urllib.request.urlopen(worker.url + path, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
    try:
        worker.wait_for(lambda s: s["enriched"] >= 2000, timeout=120)
        status, doc = get(f"/models/{sample.MODEL_ID}/drift?window=1h&feature=f0")
        assert status == 200 and [f["feature"] for f in doc["features"]] == ["f0"]
        assert doc["features"][0]["rows"] == 2000 and doc["features"][0]["psi"] > 1.0
        assert doc["features"][0]["significant"] is True and doc["features"][0]["ks_pvalue"] < 1e-12
        assert doc["min_rows"] == 500
        assert get(f"/models/{sample.MODEL_ID}/drift?window=1y")[1]["field"] == "window"
        assert get(f"/models/{sample.MODEL_ID}/drift?feature=nope")[1]["field"] == "feature"
        assert get(f"/models/{sample.MODEL_ID}/drift?windw=1h")[0] == 400
        assert get("/models/nobody/drift")[0] == 404
        assert main(["--data-dir", str(settings.data_dir), "drift", sample.MODEL_ID, "--window", "1h"]) == 0
        out = capsys.readouterr().out
        assert "psi" in out.splitlines()[1] and len(out.splitlines()) == 3 + 12
        deadline = time.monotonic() + 60
        while 'enricher_drift{feature="f0",metric="psi",model="credit_default"}' not in worker.metrics():
            assert time.monotonic() < deadline, "no drift gauge exported"
            time.sleep(0.5)
        lines = worker.metrics().splitlines()
        line = next(x for x in lines if x.startswith('enricher_drift{feature="f0",metric="psi",model="credit_default"}'))
        assert float(line.split()[-1]) > 1.0
        assert 'enricher_drift_significant{feature="f0",model="credit_default"} 1.0' in lines
        assert any(x.startswith('enricher_drift{feature="f0",metric="ks_pvalue",model="credit_default"}')
                   for x in lines)
    finally:
        worker.stop(signal.SIGTERM, timeout=30)


def test_every_figure_comes_with_its_row_count_a_ks_p_value_and_whether_it_is_significant(store):
    """111 rows drawn like the reference: PSI can read 0.1-0.2 on 10 bins from noise alone, so
    those figures are marked not significant; the KS p-value says the same on its own."""
    send, drift, *_ = store
    send(shifted(111, seed=31))
    small = {f.feature: f for f in drift.measure(sample.MODEL_ID, 3600).features}
    assert small["f0"].rows == 111 and not small["f0"].significant
    assert all(not f.significant for f in small.values())
    assert small["f0"].ks_pvalue > 0.01 and small["region"].ks_pvalue is None
    reference = drift.registry.reference(sample.MODEL_ID).column("f0").to_numpy()
    assert abs(small["f0"].ks_pvalue - ks_2samp(reference, [v for v in shifted_values(drift, "f0")],
                                                  method="asymp").pvalue) < 1e-6
    send(shifted(4000, seed=32, shift=2.0, start_ms=int(time.time() * 1000) - 150 * 60_000))
    [moved] = drift.measure(sample.MODEL_ID, 3600, feature="f0", end=time.time() - 2 * 3600).features
    assert moved.significant and moved.rows == 4000 and moved.ks_pvalue < 1e-12
    assert drift.measure(sample.MODEL_ID, 3600).as_dict()["min_rows"] == 500


def shifted_values(drift, feature):
    return [r[0] for r in drift.tables.client.query(f"SELECT `{feature}` FROM {VIEW} WHERE `{feature}` IS NOT NULL "
                                                     "AND timestamp >= now() - INTERVAL 1 HOUR").result_rows]
