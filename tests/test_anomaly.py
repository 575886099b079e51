"""Anomaly scores: the paper's 0-1 scale, and they find planted anomalies."""

import numpy as np
import pytest
from enricher.models import ENRICHMENTS
from enricher.models.reference import normalise
from enricher.models.spec import ModelSpec
from sklearn.metrics import roc_auc_score

from enricher import sample
from enricher.stream.contract import parse_batch

SPEC = ModelSpec.from_json(sample.MODEL_ID, sample.SCHEMA)


def scores_for(fitted, n, anomalies, seed=3):
    msgs, planted = sample.inferences(n, anomalies=anomalies, seed=seed)
    rows = parse_batch(msgs, [0] * n, list(range(n)), {SPEC.model_id: SPEC}.get, 1 << 20).models[SPEC.model_id]
    scores = fitted.transform(rows.batch())["anomaly_score"].to_numpy()
    is_planted = np.array([i in planted for i in rows.inference_id.to_pylist()])
    return scores, is_planted


@pytest.fixture(scope="module")
def fitted():
    return ENRICHMENTS["anomaly_detection"].fit(SPEC, normalise(SPEC, sample.reference_table(10_000)), {})


def test_planted_anomalies_are_separated(fitted):
    scores, planted = scores_for(fitted, 20_000, anomalies=40)
    assert roc_auc_score(planted, scores) >= 0.9


def test_scores_are_on_the_papers_scale(fitted):
    scores, planted = scores_for(fitted, 5000, anomalies=20)
    assert np.all((scores > 0) & (scores < 1))
    assert 0.4 <= np.median(scores[~planted]) <= 0.55   # ordinary rows: about 0.5
    assert np.median(scores[planted]) >= 0.65            # isolated quickly: towards 1


def test_a_category_never_seen_in_reference_counts_as_unusual(fitted):
    scores_seen, _ = scores_for(fitted, 2000, anomalies=0, seed=5)
    msgs, _ = sample.inferences(2000, seed=5)
    msgs = [m.replace(b'"region":"north"', b'"region":"mars"').replace(b'"region":"south"', b'"region":"mars"')
            .replace(b'"region":"east"', b'"region":"mars"').replace(b'"region":"west"', b'"region":"mars"')
            for m in msgs]
    rows = parse_batch(msgs, [0] * 2000, list(range(2000)), {SPEC.model_id: SPEC}.get, 1 << 20).models[SPEC.model_id]
    scores_new = fitted.transform(rows.batch())["anomaly_score"].to_numpy()
    assert scores_new.mean() > scores_seen.mean()


def test_invalid_settings_are_refused_with_the_setting_named():
    ad = ENRICHMENTS["anomaly_detection"]
    with pytest.raises(ValueError, match="n_estimators"):
        ad.check_config({"n_estimators": 0})
    with pytest.raises(ValueError, match="unknown setting"):
        ad.check_config({"trees": 10})
