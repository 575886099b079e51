"""Hot swap: a worker's serving state picks up published versions between
batches, and refuses a bad one while the previous keeps serving."""

import pyarrow.parquet as pq
import pytest

from enricher import metrics, sample
from enricher.serving import Serving
from models import ENRICHMENTS
from models.artifact import ArtifactStore
from models.reference import normalise
from models.registry import ModelRegistry
from models.spec import ModelSpec

AD = "anomaly_detection"
SPEC = ModelSpec.from_json(sample.MODEL_ID, sample.SCHEMA)


@pytest.fixture
def world(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    reference = tmp_path / "reference.parquet"
    pq.write_table(sample.reference_table(1000), reference)
    registry.register(sample.MODEL_ID, sample.SCHEMA, reference)
    registry.set_enrichment(sample.MODEL_ID, AD, True)
    store = ArtifactStore(tmp_path / "artifacts")
    fitted = ENRICHMENTS[AD].fit(SPEC, normalise(SPEC, sample.reference_table(1000)), {"n_estimators": 10})
    return registry, store, fitted


def publish(registry, store, fitted):
    manifest = store.publish(sample.MODEL_ID, AD, fitted.to_blobs(), 1000, fitted.parameters)
    registry.touch()
    return manifest.version


def refused_count():
    return metrics.ARTIFACT_LOADS.labels(AD, "refused")._value.get()


def test_a_published_version_is_swapped_in_on_refresh(world):
    registry, store, fitted = world
    publish(registry, store, fitted)
    serving = Serving(registry, store, min_refresh=0)
    assert serving.active(sample.MODEL_ID)[AD].version == 1
    publish(registry, store, fitted)
    assert serving.refresh()
    assert serving.active(sample.MODEL_ID)[AD].version == 2
    assert serving.describe() == {sample.MODEL_ID: {AD: 2}}


def test_a_corrupted_version_is_refused_once_and_the_previous_keeps_serving(world, caplog):
    registry, store, fitted = world
    publish(registry, store, fitted)
    serving = Serving(registry, store, min_refresh=0)
    before = serving.active(sample.MODEL_ID)[AD]
    v2 = publish(registry, store, fitted)
    forest = store.files.path(sample.MODEL_ID, AD, f"v{v2:06d}", "forest.npz")
    store.files.write(forest, b"corrupted")
    refused = refused_count()
    serving.refresh()
    assert serving.active(sample.MODEL_ID)[AD] is before  # v1, the same loaded object
    assert refused_count() == refused + 1
    assert "refused anomaly_detection artifact v2" in caplog.text and "still serving v1" in caplog.text
    registry.touch()
    serving.refresh()  # the same bad version is not read, logged or counted again
    assert refused_count() == refused + 1 and serving.active(sample.MODEL_ID)[AD] is before
    publish(registry, store, fitted)  # a good v3 comes along
    serving.refresh()
    assert serving.active(sample.MODEL_ID)[AD].version == 3


def test_turning_an_enrichment_off_stops_serving_it_at_the_next_refresh(world):
    registry, store, fitted = world
    publish(registry, store, fitted)
    serving = Serving(registry, store, min_refresh=0)
    assert AD in serving.active(sample.MODEL_ID)
    registry.set_enrichment(sample.MODEL_ID, AD, False)
    serving.refresh()
    assert serving.active(sample.MODEL_ID) == {}
