"""The flattened Isolation Forest scores exactly as scikit-learn does."""

import io

import numpy as np
import pytest
from enricher.models.forest import CompactForest
from sklearn.ensemble import IsolationForest

rng = np.random.default_rng(3)
X = rng.normal(size=(3000, 7)).astype(np.float32)
Y = np.vstack([rng.normal(size=(3000, 7)) * 2, rng.uniform(-9, 9, size=(50, 7))]).astype(np.float32)


@pytest.mark.parametrize("params", [{}, {"max_features": 0.5}, {"max_samples": 64, "n_estimators": 30},
                                    {"max_samples": 1.0}])
def test_scores_equal_scikit_learns(params):
    forest = IsolationForest(random_state=1, **params).fit(X)
    compact = CompactForest.from_sklearn(forest)
    np.testing.assert_allclose(compact.score(Y), -forest.score_samples(Y), rtol=0, atol=1e-7)
    np.testing.assert_allclose(compact.score(Y[:3]), -forest.score_samples(Y[:3]), rtol=0, atol=1e-7)


def test_values_on_a_threshold_go_the_same_way():
    # Inputs equal to the split thresholds are where float32/float64 rounding would bite.
    forest = IsolationForest(random_state=2, n_estimators=20).fit(X)
    thresholds = np.concatenate([e.tree_.threshold[e.tree_.feature >= 0] for e in forest.estimators_])
    edge = np.tile(thresholds.astype(np.float32)[:, None], (1, 7))
    np.testing.assert_allclose(CompactForest.from_sklearn(forest).score(edge), -forest.score_samples(edge),
                               rtol=0, atol=1e-7)


def test_round_trip_through_bytes_without_pickle():
    compact = CompactForest.from_sklearn(IsolationForest(random_state=0, n_estimators=10).fit(X))
    again = CompactForest.from_bytes(compact.to_bytes())
    assert np.array_equal(again.score(Y), compact.score(Y))


def test_corrupt_arrays_are_refused_not_indexed():
    compact = CompactForest.from_sklearn(IsolationForest(random_state=0, n_estimators=5).fit(X))
    compact.children[3, 0] = 10**6
    with pytest.raises(ValueError, match="out of range"):
        CompactForest.from_bytes(compact.to_bytes())


def test_object_arrays_are_never_unpickled():
    compact = CompactForest.from_sklearn(IsolationForest(random_state=0, n_estimators=5).fit(X))
    with np.load(io.BytesIO(compact.to_bytes())) as z:
        arrays = dict(z)
    arrays["feature"] = np.array([object()] * len(arrays["feature"]), dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(ValueError, match="allow_pickle"):
        CompactForest.from_bytes(buf.getvalue())


def test_wrong_width_is_refused():
    compact = CompactForest.from_sklearn(IsolationForest(random_state=0, n_estimators=5).fit(X))
    with pytest.raises(ValueError, match="expects 7 features"):
        compact.score(Y[:, :5])
