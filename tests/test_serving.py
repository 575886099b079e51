"""Hot swap: a worker's serving state picks up published versions between
batches, and refuses a bad one while the previous keeps serving."""

import pyarrow.parquet as pq
import pytest
from enricher.models import ENRICHMENTS
from enricher.models.artifact import ArtifactStore
from enricher.models.reference import normalise
from enricher.models.registry import ModelRegistry
from enricher.models.spec import ModelSpec

from enricher import metrics, sample
from enricher.stream.serving import Serving

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
    return metrics.ARTIFACT_LOADS.labels(sample.MODEL_ID, AD, "refused")._value.get()


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


def test_a_version_that_could_not_be_read_is_tried_again_and_served_once_the_store_answers(tmp_path, monkeypatch):
    # A real S3 endpoint (moto's server) that goes away and comes back on the same port.
    import boto3
    from moto.server import ThreadedMotoServer

    from enricher.broker import free_port

    port = free_port()
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="art")
        registry = ModelRegistry(tmp_path / "registry")
        reference = tmp_path / "reference.parquet"
        pq.write_table(sample.reference_table(1000), reference)
        registry.register(sample.MODEL_ID, sample.SCHEMA, reference)
        registry.set_enrichment(sample.MODEL_ID, AD, True)
        url = f"s3://art/x?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        store = ArtifactStore(url)
        fitted = ENRICHMENTS[AD].fit(SPEC, normalise(SPEC, sample.reference_table(1000)), {"n_estimators": 10})
        publish(registry, store, fitted)
        serving = Serving(registry, store, min_refresh=0)
        assert serving.active(sample.MODEL_ID)[AD].version == 1
        serving.retry_unreadable = 0.0    # try again at the next refresh, not in 30 s
        publish(registry, store, fitted)  # v2 is published...
        server.stop()                     # ...and the store stops answering before the worker reads it
        serving.refresh()
        assert serving.active(sample.MODEL_ID)[AD].version == 1, "v1 keeps serving"
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()                    # back, with its objects (moto keeps them in process)
        assert serving.refresh(), "a version that could not be read is tried again without a new publish"
        assert serving.active(sample.MODEL_ID)[AD].version == 2
    finally:
        server.stop()
