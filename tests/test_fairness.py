"""The fairness report: per sensitive group, the raw and the mitigated decisions' rates and
each constraint's gap, counted in ClickHouse SQL, equal to NumPy on the same rows."""

import json

import numpy as np
import pytest
from enricher.pipelines.train import train

from enricher import sample
from enricher.errors import Conflict
from enricher.store.reports import REPORTS, ReportStore

from .test_labels import engine, inferences  # noqa: F401 - a fixture


def test_rates_and_gaps_before_and_after_mitigation_equal_numpy(engine):  # noqa: F811
    processor, send, sweep, registry, settings = engine
    registry.set_enrichment(sample.MODEL_ID, "bias_mitigation", True, {"max_gap": 0.0})
    train(registry, settings.artifacts(), sample.MODEL_ID, log=lambda m: None)
    processor.serving.refresh()
    rng = np.random.default_rng(4)
    msgs = [json.loads(m) for m in inferences(3000, "fair", seed=4)]
    for i, m in enumerate(msgs):
        if i % 10 < 8:  # 80% labelled
            m["label"] = int(rng.random() < m["prediction"])
        if i % 97 == 0:
            m["attributes"] = {}  # no sensitive value: its own NULL group, no mitigated decision
    send(msgs)
    store = ReportStore(settings, registry)
    try:
        report = store.run(REPORTS["fairness"], sample.MODEL_ID, "1d")
        _, rows = [None, processor.sink.tables.client.query(
            f"SELECT ifNull(sex, 'NULL'), prediction, label, bias_mitigated_prediction FROM enricher.{sample.MODEL_ID}"
        ).result_rows]
    finally:
        store.close()
    [sex] = report["attributes"]
    g = np.array([r[0] for r in rows])
    s = np.array([r[1] for r in rows])
    y = np.array([np.nan if r[2] is None else r[2] for r in rows])
    m = np.array([np.nan if r[3] is None else r[3] for r in rows])
    raw = s >= 0.5
    want = {}
    for group in np.unique(g):
        k = g == group
        mk = k & ~np.isnan(m)
        want[group] = {"raw": (raw[k].mean(), raw[k & (y == 1)].mean(), raw[k & (y == 0)].mean()),
                       "mitigated": (m[mk].mean() if mk.any() else None,
                                     m[mk & (y == 1)].mean() if (mk & (y == 1)).any() else None,
                                     m[mk & (y == 0)].mean() if (mk & (y == 0)).any() else None)}
    assert {x["group"] for x in sex["groups"]} == set(want) == {"f", "m", "NULL"}
    for x in sex["groups"]:
        for decision in ("raw", "mitigated"):
            got = (x[decision]["selection_rate"], x[decision]["tpr"], x[decision]["fpr"])
            for a, b in zip(got, want[x["group"]][decision]):
                assert (a is None and b is None) or abs(a - b) < 1e-12, (x["group"], decision, got)
    assert next(x for x in sex["groups"] if x["group"] == "NULL")["mitigated"]["rows"] == 0
    for decision, index in (("raw", 1), ("mitigated", 1)):
        rates = [want[k][decision][index] for k in ("f", "m")]
        assert abs(sex["gaps"][decision]["equal_opportunity"] - abs(rates[0] - rates[1])) < 1e-12


def test_a_model_the_report_cannot_read_is_told_why(engine, tmp_path):  # noqa: F811
    processor, send, sweep, registry, settings = engine
    registry.register("prices", dict(sample.SCHEMA, task="regression"), tmp_path / f"reference-{sample.MODEL_ID}.parquet")
    store = ReportStore(settings, registry)
    try:
        with pytest.raises(Conflict, match="binary classifier"):
            store.run(REPORTS["fairness"], "prices", "1d")
    finally:
        store.close()
