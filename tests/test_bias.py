"""Bias mitigation against known answers: a planted group disparity, fairlearn's own rule,
replays, unseen groups (enricher/models/bias.py)."""

import numpy as np
import pyarrow as pa
import pytest
from enricher.models.bias import OUTPUT, BiasMitigation, _Scores
from enricher.models.enrichment import InferenceBatch, Unusable
from enricher.models.reference import normalise
from enricher.models.spec import ModelSpec
from fairlearn.postprocessing import ThresholdOptimizer

SCHEMA = {"task": "binary_classification",
          "features": [{"name": "x", "type": "numeric"}],
          "attributes": [{"name": "group", "type": "categorical", "sensitive": True}]}
SPEC = ModelSpec.from_json("loans", SCHEMA)


def planted(n, seed):
    """Group b is 30% of rows, qualifies less often, and the model scores it lower still."""
    rng = np.random.default_rng(seed)
    group = rng.choice(["a", "b"], n, p=[0.7, 0.3])
    y = (rng.random(n) < np.where(group == "a", 0.5, 0.35)).astype(float)
    score = np.clip(0.45 * y + rng.normal(0.3, 0.18, n) - np.where(group == "b", 0.12, 0.0), 0, 1)
    return pa.table({"x": rng.normal(size=n), "group": group, "prediction": score, "label": y})


def batch(table, prefix="r"):
    table = normalise(SPEC, table)
    b = InferenceBatch.from_reference(SPEC, table)
    b.inference_id = pa.array([f"{prefix}-{i}" for i in range(table.num_rows)])
    return b


def tpr(decision, table, group):
    y, g = table.column("label").to_numpy(), table.column("group").to_numpy(zero_copy_only=False)
    rows = (g == group) & (y == 1)
    return decision[rows].mean(), rows.sum()


@pytest.fixture(scope="module")
def fitted():
    train = planted(6000, seed=1)
    return train, BiasMitigation().fit(SPEC, normalise(SPEC, train), {"max_gap": 0.0})


def test_equal_opportunity_halves_the_gap_on_held_out_rows_for_little_accuracy(fitted):
    _, artifact = fitted
    test = planted(20000, seed=2)
    decided = artifact.transform(batch(test))[OUTPUT].to_numpy(zero_copy_only=False)
    raw = (test.column("prediction").to_numpy() >= 0.5).astype(float)
    y = test.column("label").to_numpy()
    raw_gap = abs(tpr(raw, test, "a")[0] - tpr(raw, test, "b")[0])
    new_gap = abs(tpr(decided, test, "a")[0] - tpr(decided, test, "b")[0])
    assert raw_gap > 0.1 and new_gap <= raw_gap / 2, (raw_gap, new_gap)
    assert (decided == y).mean() >= (raw == y).mean() - 0.05
    q = artifact.quality
    assert q["constraint"] == "equal_opportunity" and q["gap"] <= 1e-9 and q["raw_gap"] > 0.1


def test_randomised_decisions_meet_fairlearns_expected_rates_and_a_replay_decides_the_same(fitted):
    train, artifact = fitted
    s, y, g = (train.column(c).to_numpy(zero_copy_only=False) for c in ("prediction", "label", "group"))
    optimizer = ThresholdOptimizer(estimator=_Scores().fit(s.reshape(-1, 1), y), constraints="true_positive_rate_parity",
                                   prefit=True, predict_method="predict", grid_size=1000)
    optimizer.fit(s.reshape(-1, 1), y, sensitive_features=g)
    test = planted(40000, seed=3)
    ts, tg = test.column("prediction").to_numpy(), test.column("group").to_numpy(zero_copy_only=False)
    expected = optimizer._pmf_predict(ts.reshape(-1, 1), sensitive_features=tg)[:, 1]
    ours = artifact.transform(batch(test))[OUTPUT].to_numpy(zero_copy_only=False)
    for group in ("a", "b"):
        want, n = tpr(expected, test, group)
        got, _ = tpr(ours.astype(float), test, group)
        assert abs(got - want) < 4 * np.sqrt(want * (1 - want) / n), (group, got, want)
    # the same ids decide the same, in any batch and order
    again = artifact.transform(batch(test).slice(1000, 500))[OUTPUT].to_numpy(zero_copy_only=False)
    assert (again == ours[1000:1500]).all()


def test_a_group_never_seen_in_training_or_no_attribute_gets_null(fitted):
    _, artifact = fitted
    table = planted(6, seed=4).set_column(1, "group", pa.array(["a", "b", "c", None, "a", "zz"]))
    out = artifact.transform(batch(table))[OUTPUT]
    assert out.is_null().to_pylist() == [False, False, True, True, False, True]


def test_the_curve_runs_from_exact_to_unconstrained_and_another_point_needs_no_refit(fitted):
    _, artifact = fitted
    for constraint in ("demographic_parity", "equal_opportunity", "equalized_odds"):
        curve = artifact.doc["curves"][constraint]["group"]
        assert len(curve) >= 100
        assert curve[0]["gap"] < 0.02 and curve[-1]["gap"] > curve[0]["gap"]
        assert curve[-1]["accuracy"] >= curve[0]["accuracy"] - 1e-9
    other = artifact.choose("demographic_parity", 100)
    assert other.quality["constraint"] == "demographic_parity" and other.quality["point"] == 100
    with pytest.raises(ValueError, match="index 500"):
        artifact.choose("demographic_parity", 500)


def test_deterministic_mode_is_one_threshold_per_group_and_reports_its_gap(fitted):
    train, _ = fitted
    artifact = BiasMitigation().fit(SPEC, normalise(SPEC, train), {"mode": "deterministic", "max_gap": 0.05})
    point = artifact.doc["curves"]["equal_opportunity"]["group"][artifact.doc["chosen"]]
    thresholds = point["deterministic"]["thresholds"]
    out = artifact.transform(batch(train))[OUTPUT].to_numpy(zero_copy_only=False)
    s, g = train.column("prediction").to_numpy(), train.column("group").to_numpy(zero_copy_only=False)
    assert (out == np.where(g == "a", s >= thresholds["a"], s >= thresholds["b"])).all()
    measured = abs(tpr(out.astype(float), train, "a")[0] - tpr(out.astype(float), train, "b")[0])
    assert abs(measured - artifact.quality["gap"]) < 1e-9 and artifact.quality["gap"] <= 0.05


@pytest.mark.parametrize("schema, reference, reason", [
    ({**SCHEMA, "task": "regression"}, None, "binary classifier"),
    ({**SCHEMA, "attributes": [{"name": "group", "type": "categorical"}]}, None, "sensitive attribute"),
    (SCHEMA, pa.schema([("x", pa.float64()), ("prediction", pa.float64())]), "no label column"),
])
def test_models_it_cannot_serve_are_refused_with_the_reason(schema, reference, reason):
    with pytest.raises(Unusable, match=reason):
        BiasMitigation().check_model(ModelSpec.from_json("m", schema), reference)


@pytest.mark.parametrize("constraint, method", [("demographic_parity", "demographic_parity"),
                                                ("equal_opportunity", "true_positive_rate_parity")])
def test_each_relaxed_point_is_fairlearns_own_fit_at_that_tol(fitted, constraint, method):
    """The curve reuses one fit's per-group curves for every tol; this pins it to what
    ThresholdOptimizer(tol=...) itself returns, so a fairlearn upgrade that changes it fails here."""
    from enricher.models.bias import rule_from_fairlearn

    train, artifact = fitted
    s, y, g = (train.column(c).to_numpy(zero_copy_only=False) for c in ("prediction", "label", "group"))
    curve = artifact.doc["curves"][constraint]["group"]
    for k in (7, 33, 71):
        optimizer = ThresholdOptimizer(estimator=_Scores().fit(s.reshape(-1, 1), y), constraints=method,
                                       prefit=True, predict_method="predict", grid_size=1000, tol=curve[k]["tol"])
        optimizer.fit(s.reshape(-1, 1), y, sensitive_features=g)
        want = {str(a): rule_from_fairlearn(b) for a, b in optimizer.interpolated_thresholder_.interpolation_dict.items()}
        assert curve[k]["rules"] == want, (constraint, k)


def test_the_decision_draw_is_fnv1a_with_murmur3s_finaliser_over_the_ids_utf8_bytes():
    """The randomised decisions' draw must stay the same hash across releases (a replay after
    an upgrade decides the same): checked against a plain-Python FNV-1a + fmix64."""
    import pyarrow as pa
    from enricher.models.hashing import id_hashes

    def reference(text: str) -> int:
        mask, h = (1 << 64) - 1, 14695981039346656037
        for b in text.encode():
            h = ((h ^ b) * 1099511628211) & mask
        for shift, mul in ((33, 0xFF51AFD7ED558CCD), (33, 0xC4CEB9FE1A85EC53), (33, None)):
            h ^= h >> shift
            if mul:
                h = (h * mul) & mask
        return h

    ids = ["inf-0000001", "inf-0000002", "", "é☃" * 40, "a" * 300, "3f2b8c1e-1d2a-4c8e-9d1b-0a9e2f4c6b7d"]
    array = pa.array(["x", *ids, None]).slice(1, len(ids))  # an offset, as a batch's slice has
    assert [int(h) for h in id_hashes(array)] == [reference(t) for t in ids]
