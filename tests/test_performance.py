"""The performance report: computed in ClickHouse SQL over the rows whose label has arrived,
equal to scikit-learn's metrics on the same rows (enricher/store/performance.py)."""

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    precision_score,
    r2_score,
    recall_score,
    roc_auc_score,
)

from enricher import sample
from enricher.cli import main
from enricher.errors import InvalidArgument
from enricher.store.reports import REPORTS, ReportStore

from .test_labels import engine, inferences, label  # noqa: F401 - a fixture

PERFORMANCE = REPORTS["performance"]


def close(a, b):
    return a is not None and abs(a - b) <= 1e-9


def stream(send, sweep, model_id, predict, truth, n=1200, seed=5, late=0.25, missing=0.15):
    """n inferences of `model_id` with predictions; most labelled with the inference, a share
    labelled later (label updates, brought by the sweep), a share never. Returns the rows
    (inference id, prediction, label or None, region, f0) as they should be once swept."""
    rng = np.random.default_rng(seed)
    msgs = [json.loads(m) for m in inferences(n, f"p{seed}", model_id=model_id, seed=seed)]
    rows, updates = [], []
    for m in msgs:
        m["prediction"], y = predict(rng, m), None
        u = rng.random()
        y = truth(rng, m) if u >= missing else None
        if y is not None and u < missing + late:
            updates.append(label(m["inference_id"], y, model=model_id))
        elif y is not None:
            m["label"] = y
        rows.append((m["inference_id"], m["prediction"], y, m["features"]["region"], m["features"]["f0"]))
    send(msgs)
    send(updates)
    sweep.run()
    return rows


def run(settings, registry, **kw):
    store = ReportStore(settings, registry)
    try:
        return store.run(PERFORMANCE, kw.pop("model_id", sample.MODEL_ID), "1d", **kw)
    finally:
        store.close()


def test_a_binary_scorer_s_figures_equal_scikit_learn_on_the_labelled_rows_also_per_segment(engine):  # noqa: F811
    processor, send, sweep, registry, settings = engine

    def score(rng, m):  # rounded to two decimals: many ties, which ROC AUC must average
        return round(float(np.clip(0.5 + 0.3 * np.tanh(m["features"]["f0"]) + rng.normal(0, 0.2), 0, 1)), 2)

    rows = stream(send, sweep, sample.MODEL_ID, score,
                  lambda rng, m: int(rng.random() < 0.5 + 0.4 * np.tanh(m["features"]["f0"])))
    report = run(settings, registry, options={"by": "region"})

    def expected(subset):
        y = np.array([r[2] for r in subset if r[2] is not None])
        s = np.array([r[1] for r in subset if r[2] is not None])
        d = (s >= 0.5).astype(int)
        return {"accuracy": accuracy_score(y, d), "precision": precision_score(y, d), "recall": recall_score(y, d),
                "f1": f1_score(y, d), "roc_auc": roc_auc_score(y, s)}, len(subset), len(y)

    want, n, labelled = expected(rows)
    assert report["rows"] == n and report["labelled"] == labelled and 0.75 < labelled / n < 0.95
    assert close(report["label_coverage"], labelled / n)
    for name, value in want.items():
        assert close(report["metrics"][name], value), (name, report["metrics"][name], value)
    segments = {s["segment"]: s for s in report["segments"]}
    assert set(segments) == {r[3] for r in rows}
    for region, seg in segments.items():
        want, n, labelled = expected([r for r in rows if r[3] == region])
        assert seg["rows"] == n and seg["labelled"] == labelled
        for name, value in want.items():
            assert close(seg["metrics"][name], value), (region, name)


def test_a_numeric_segment_is_a_decile_of_the_window_and_a_label_outside_0_1_is_left_out(engine):  # noqa: F811
    processor, send, sweep, registry, settings = engine
    rows = stream(send, sweep, sample.MODEL_ID, lambda rng, m: round(float(rng.random()), 3),
                  lambda rng, m: int(rng.integers(0, 2)), n=1000, seed=8, missing=0.0, late=0.0)
    send([label(rows[0][0], 7)])  # not a class of a binary model
    sweep.run()
    report = run(settings, registry, options={"by": "f0"})
    assert report["unusable_labels"] == 1 and report["labelled"] == 1000
    sizes = [s["rows"] for s in report["segments"]]
    assert len(sizes) == 10 and sum(sizes) == 1000 and max(sizes) - min(sizes) <= 2
    values = np.array([r[4] for r in rows])
    for seg in report["segments"]:
        lo, hi = seg["low"] if seg["low"] is not None else -np.inf, seg["high"] if seg["high"] is not None else np.inf
        assert seg["rows"] == int(((values >= lo) & (values < hi)).sum()), seg["segment"]


def test_class_labels_give_accuracy_and_macro_f1_as_scikit_learn(engine, tmp_path):  # noqa: F811
    processor, send, sweep, registry, settings = engine
    registry.register("classes", dict(sample.SCHEMA, task="multiclass_classification"),
                      tmp_path / f"reference-{sample.MODEL_ID}.parquet")
    processor.serving.refresh()
    animals = ["cat", "dog", "emu", "yak"]
    rows = stream(send, sweep, "classes", lambda rng, m: animals[int(rng.integers(0, 3))],  # never predicts yak
                  lambda rng, m: animals[int(rng.integers(0, 4))] if rng.random() < 0.6 else None)
    report = run(settings, registry, model_id="classes")
    y = [r[2] for r in rows if r[2] is not None]
    p = [r[1] for r in rows if r[2] is not None]
    assert report["labelled"] == len(y)
    assert close(report["metrics"]["accuracy"], accuracy_score(y, p))
    assert close(report["metrics"]["macro_f1"], f1_score(y, p, average="macro"))


def test_a_regression_s_mae_rmse_and_r2_equal_scikit_learn(engine, tmp_path):  # noqa: F811
    processor, send, sweep, registry, settings = engine
    registry.register("prices", dict(sample.SCHEMA, task="regression"), tmp_path / f"reference-{sample.MODEL_ID}.parquet")
    processor.serving.refresh()
    rows = stream(send, sweep, "prices", lambda rng, m: float(3 * m["features"]["f0"] + rng.normal()),
                  lambda rng, m: float(3 * m["features"]["f0"] + rng.normal(0, 2)))
    report = run(settings, registry, model_id="prices")
    y = np.array([r[2] for r in rows if r[2] is not None])
    p = np.array([r[1] for r in rows if r[2] is not None])
    assert close(report["metrics"]["mae"], mean_absolute_error(y, p))
    assert close(report["metrics"]["rmse"], float(np.sqrt(mean_squared_error(y, p))))
    assert close(report["metrics"]["r2"], r2_score(y, p))


def test_a_window_without_labels_says_so_and_the_cli_prints_the_report(engine, capsys):  # noqa: F811
    processor, send, sweep, registry, settings = engine
    send(inferences(50, "nolabel"))
    report = run(settings, registry)
    assert report["rows"] == 50 and report["labelled"] == 0
    assert report["metrics"] == {name: None for name in ("accuracy", "precision", "recall", "f1", "roc_auc")}
    with pytest.raises(InvalidArgument) as err:
        run(settings, registry, options={"by": "nope"})
    assert err.value.field == "by"
    processor.sink.tables.client.close()  # the CLI opens the store itself
    assert main(["--data-dir", str(settings.data_dir), "performance", sample.MODEL_ID, "--window", "1h"]) == 0
    out = capsys.readouterr().out
    assert "no labelled rows in this window" in out and "roc_auc" in out
    assert main(["--data-dir", str(settings.data_dir), "performance", sample.MODEL_ID, "--by", "nope"]) == 2
    assert "no feature or attribute 'nope'" in capsys.readouterr().err
