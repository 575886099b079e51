"""Artifacts: versioned, verified before anything is deserialised, tamper-proof."""

import json

import numpy as np
import pytest
from enricher.models import ENRICHMENTS
from enricher.models.artifact import ArtifactError, ArtifactStore, IntegrityError
from enricher.models.reference import normalise
from enricher.models.spec import ModelSpec

from enricher import sample
from enricher.stream.contract import parse_batch

SPEC = ModelSpec.from_json(sample.MODEL_ID, sample.SCHEMA)
AD = ENRICHMENTS["anomaly_detection"]


@pytest.fixture(scope="module")
def fitted():
    return AD.fit(SPEC, normalise(SPEC, sample.reference_table(2000)), {})


def batch_of(n=500):
    msgs, _ = sample.inferences(n, anomalies=5)
    rows = parse_batch(msgs, [0] * n, list(range(n)), {SPEC.model_id: SPEC}.get, 1 << 20).models[SPEC.model_id]
    return rows.batch()


def publish(store, fitted):
    return store.publish(SPEC.model_id, AD.name, fitted.to_blobs(), 2000, fitted.parameters)


def test_round_trip_gives_the_same_scores_and_a_complete_manifest(tmp_path, fitted):
    store = ArtifactStore(tmp_path)
    manifest = publish(store, fitted)
    assert (manifest.version, manifest.model_id, manifest.enrichment) == (1, SPEC.model_id, AD.name)
    assert manifest.training_rows == 2000 and manifest.parameters["n_estimators"] == 100
    assert set(manifest.files) == {"encoder.json", "forest.npz"} and manifest.created_at
    on_disk = json.loads((tmp_path / SPEC.model_id / AD.name / "v000001" / "manifest.json").read_text())
    assert on_disk["format_version"] == 1 and len(on_disk["files"]["forest.npz"]) == 64
    loaded = store.load(SPEC.model_id, AD.name)
    again = AD.load(SPEC, loaded.manifest, loaded.blobs)
    b = batch_of()
    np.testing.assert_array_equal(again.transform(b)["anomaly_score"].to_numpy(),
                                  fitted.transform(b)["anomaly_score"].to_numpy())


def test_versions_count_up_and_current_follows_the_latest(tmp_path, fitted):
    store = ArtifactStore(tmp_path)
    publish(store, fitted)
    publish(store, fitted)
    assert store.versions(SPEC.model_id, AD.name) == [1, 2]
    assert store.current_version(SPEC.model_id, AD.name) == 2
    store.set_current(SPEC.model_id, AD.name, 1)
    assert store.load(SPEC.model_id, AD.name).manifest.version == 1
    assert not list((tmp_path / SPEC.model_id / AD.name).glob(".publishing-*")), "no half-written versions left"


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _vdir(tmp_path):
    return tmp_path / SPEC.model_id / AD.name / "v000001"


@pytest.mark.parametrize("tamper, message", [
    (lambda d: (d / "forest.npz").write_bytes(_flip((d / "forest.npz").read_bytes(), 100)), "sha256"),
    (lambda d: (d / "encoder.json").write_text("{}"), "sha256"),
    (lambda d: (d / "extra.pkl").write_bytes(b"x"), "differ from the manifest"),
    (lambda d: (d / "forest.npz").unlink(), "differ from the manifest"),
    (lambda d: (d / "manifest.json").write_text("{nope"), "unreadable manifest"),
])
def test_a_tampered_artifact_is_refused_before_it_is_deserialised(tmp_path, fitted, tamper, message, monkeypatch):
    store = ArtifactStore(tmp_path)
    publish(store, fitted)
    tamper(_vdir(tmp_path))
    from enricher.models.forest import CompactForest
    calls = []
    monkeypatch.setattr(CompactForest, "from_bytes", classmethod(lambda *a: calls.append(a)))
    with pytest.raises(IntegrityError, match=message):
        store.load(SPEC.model_id, AD.name)
    assert calls == []


def test_a_manifest_rewritten_to_match_tampered_files_fails_the_signature(tmp_path, fitted):
    store = ArtifactStore(tmp_path, signing_key=b"secret")
    publish(store, fitted)
    d = _vdir(tmp_path)
    (d / "forest.npz").write_bytes(b"evil")
    manifest = json.loads((d / "manifest.json").read_text())
    import hashlib
    manifest["files"]["forest.npz"] = hashlib.sha256(b"evil").hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="signature"):
        store.load(SPEC.model_id, AD.name)
    # and an unsigned artifact is refused once a key is configured
    unsigned = ArtifactStore(tmp_path / "other")
    publish(unsigned, fitted)
    with pytest.raises(IntegrityError, match="not signed"):
        ArtifactStore(tmp_path / "other", signing_key=b"secret").load(SPEC.model_id, AD.name)


def test_loading_an_untrained_enrichment_says_to_train(tmp_path):
    with pytest.raises(ArtifactError, match="train it first"):
        ArtifactStore(tmp_path).load(SPEC.model_id, AD.name)


def test_an_artifact_for_other_features_is_refused_on_load(tmp_path, fitted):
    store = ArtifactStore(tmp_path)
    publish(store, fitted)
    other = ModelSpec.from_json(SPEC.model_id, {**sample.SCHEMA, "features": sample.SCHEMA["features"][:3]})
    loaded = store.load(SPEC.model_id, AD.name)
    with pytest.raises(ValueError, match="retrain"):
        AD.load(other, loaded.manifest, loaded.blobs)


# -- retention, rollback, object store -------------------------------------------------
def test_old_versions_beyond_keep_are_removed_but_never_the_current_one(tmp_path, fitted):
    store = ArtifactStore(tmp_path, keep=2)
    for _ in range(4):
        publish(store, fitted)
    assert store.versions(SPEC.model_id, AD.name) == [3, 4]
    store.set_current(SPEC.model_id, AD.name, 3)  # roll back
    publish(store, fitted)  # v5 is current now; v3 is the oldest, v4 goes
    assert store.versions(SPEC.model_id, AD.name) == [4, 5]
    with pytest.raises(ArtifactError, match="no version 1 .kept: v4, v5"):
        store.set_current(SPEC.model_id, AD.name, 1)


def test_a_version_folder_without_manifest_is_not_a_version(tmp_path, fitted):
    store = ArtifactStore(tmp_path)
    publish(store, fitted)
    half = tmp_path / SPEC.model_id / AD.name / "v000002"
    half.mkdir()
    (half / "forest.npz").write_bytes(b"half written")
    assert store.versions(SPEC.model_id, AD.name) == [1]
    assert store.load(SPEC.model_id, AD.name).manifest.version == 1


def test_an_object_store_holds_versions_the_same_way(s3, fitted):
    store = ArtifactStore(s3, signing_key=b"k", keep=2)
    for _ in range(3):
        publish(store, fitted)
    assert store.versions(SPEC.model_id, AD.name) == [2, 3]
    assert store.current_version(SPEC.model_id, AD.name) == 3
    loaded = store.load(SPEC.model_id, AD.name)
    again = AD.load(SPEC, loaded.manifest, loaded.blobs)
    b = batch_of()
    np.testing.assert_array_equal(again.transform(b)["anomaly_score"].to_numpy(),
                                  fitted.transform(b)["anomaly_score"].to_numpy())
    assert store.set_current(SPEC.model_id, AD.name, 2).version == 2
    assert ArtifactStore(s3, signing_key=b"k").load(SPEC.model_id, AD.name).manifest.version == 2


def test_an_object_store_artifact_tampered_with_is_refused(s3, fitted):
    store = ArtifactStore(s3.replace("/enricher?", "/tamper?"))
    manifest = publish(store, fitted)
    path = f"{store._dir(SPEC.model_id, AD.name)}/v{manifest.version:06d}/forest.npz"
    store.files.write(path, b"not the forest")
    with pytest.raises(IntegrityError, match="sha256"):
        store.load(SPEC.model_id, AD.name)


def test_an_unusable_store_url_says_so():
    with pytest.raises(ArtifactError, match="artifact store"):
        ArtifactStore("nosuchscheme://x/y")


def test_reference_data_can_come_from_the_object_store(s3, tmp_path):
    import io

    import pyarrow.parquet as pq
    from enricher.models.artifact import Files
    from enricher.models.reference import ReferenceDataError, read_table
    from enricher.models.registry import ModelRegistry

    buf = io.BytesIO()
    pq.write_table(sample.reference_table(300), buf)
    files = Files(s3.replace("/enricher?", "/references?"))
    files.write(files.path("credit.parquet"), buf.getvalue())
    url = s3.replace("/enricher?", "/references/credit.parquet?")
    assert read_table(url).num_rows == 300
    ModelRegistry(tmp_path / "registry").register("credit", sample.SCHEMA, url)
    with pytest.raises(ReferenceDataError, match="does not exist"):
        read_table(url.replace("credit.parquet", "nosuch.parquet"))


def test_an_api_location_in_the_object_store_is_read_from_the_configured_endpoint(s3, tmp_path):
    """Through the API a reference is s3://BUCKET/KEY only; the endpoint is the operator's
    (here, the artifact store's), never one the caller names (enricher/control/locations.py)."""
    import io

    import pyarrow.parquet as pq
    from enricher.models.artifact import Files
    from enricher.models.reference import read_table

    from enricher.config import Settings
    from enricher.control.locations import LocationRefused, Locations

    buf = io.BytesIO()
    pq.write_table(sample.reference_table(300), buf)
    files = Files(s3.replace("/enricher?", "/references?"))
    files.write(files.path("api.parquet"), buf.getvalue())
    locations = Locations.from_settings(Settings.from_env(env={}, data_dir=str(tmp_path), artifact_store_url=s3))
    resolved = locations.resolve("s3://artifacts/references/api.parquet", "reference")
    assert resolved.startswith("s3://artifacts/references/api.parquet?") and "endpoint_override=127.0.0.1" in resolved
    assert read_table(resolved).num_rows == 300
    with pytest.raises(LocationRefused, match="not allowed"):
        locations.resolve(s3.replace("/enricher?", "/references/api.parquet?"), "reference")
    # the operator's explicit setting wins over the artifact store's options
    named = Locations.from_settings(Settings.from_env(env={}, data_dir=str(tmp_path), artifact_store_url=s3,
                                                      object_store_endpoint="store.internal:9000"))
    assert "endpoint_override=store.internal%3A9000" in named.resolve("s3://bucket/k.csv", "reference")
