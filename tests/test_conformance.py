"""Every registered enrichment passes the conformance check (models/conformance.py), and the check catches what it claims to."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
from enricher.models import ENRICHMENTS
from enricher.models.catalog import model_outputs
from enricher.models.conformance import check_enrichment, sample_models
from enricher.models.enrichment import Output, Unusable, reserves
from enricher.models.spec import ModelSpec, SpecError

from enricher.http.api import http_status
from enricher.store.clickhouse import FIXED_COLUMNS, spec_columns, view_columns


@pytest.mark.parametrize("name", sorted(ENRICHMENTS))
def test_every_enrichment_conforms(name):
    used = check_enrichment(ENRICHMENTS[name])
    assert used


def test_no_two_enrichments_reserve_the_same_names():
    for spec, _ in sample_models(200):
        for name, outputs in model_outputs(spec):
            for out in outputs:
                owners = [e for e in ENRICHMENTS.values() if reserves(e, out.name) or reserves(e, out.storage)]
                assert [e.name for e in owners] == [name], (out, [e.name for e in owners])


def test_a_feature_named_like_an_enrichment_column_is_refused_naming_the_enrichment():
    for name, enrichment in ENRICHMENTS.items():
        spec, _ = sample_models(50)[0]
        for out in enrichment.outputs(spec)[:1]:
            doc = {"task": "regression", "features": [{"name": out.name, "type": "numeric"}]}
            with pytest.raises(SpecError, match=f"features\\[0\\].name.*reserved for the {name}"):
                ModelSpec.from_json("m", doc)
        with pytest.raises(SpecError, match=f"reserved for the {name}"):
            ModelSpec.from_json("m", {"task": "regression", "features": [{"name": f"{name}_version",
                                                                          "type": "numeric"}]})


def test_the_view_and_storage_take_each_usable_enrichments_declared_outputs():
    for spec, _ in sample_models(50):
        view = dict(view_columns(spec))
        storage = spec_columns(spec)
        for name, outputs in model_outputs(spec):
            for out in outputs:
                assert view[out.name] == out.storage
                assert storage[out.storage][1] == out.type
        assert not set(storage) & set(FIXED_COLUMNS)


# -- the check catches a broken enrichment ---------------------------------

class _Broken:
    """Wraps a real enrichment and breaks one thing."""

    def __init__(self, inner, **changes):
        self._inner, self._changes = inner, changes
        self.name, self.reserved = inner.name, inner.reserved

    def __getattr__(self, item):
        return self._changes.get(item) or getattr(self._inner, item)


AD = ENRICHMENTS["anomaly_detection"]


def test_the_check_catches_an_undeclared_output_name():
    bad = _Broken(AD, outputs=lambda spec: [Output("score", pa.float64(), "anomaly_score")])
    with pytest.raises(AssertionError, match="not among the names it reserves"):
        check_enrichment(bad)


def test_the_check_catches_an_artifact_that_depends_on_its_batch():
    class Batchy:
        def __init__(self, fitted):
            self.fitted, self.parameters, self.quality = fitted, fitted.parameters, fitted.quality

        def to_blobs(self):
            return self.fitted.to_blobs()

        def transform(self, batch):
            out = self.fitted.transform(batch)
            s = out["anomaly_score"].to_numpy(zero_copy_only=False)
            return {"anomaly_score": pa.array(s - s.mean() + 0.5 if len(s) else s)}

    bad = _Broken(AD, fit=lambda *a: Batchy(AD.fit(*a)), load=lambda *a: Batchy(AD.load(*a)))
    with pytest.raises(AssertionError, match="depends on the other rows"):
        check_enrichment(bad)


def test_the_check_catches_a_pool_that_mixes_up_its_models():
    class Mixed:
        """Every row scored by the pool's first model."""

        def __init__(self, pool):
            self.inner, self.features = pool, pool.features

        def transform(self, batch, member):
            return self.inner.transform(batch, np.zeros_like(member))

    bad = _Broken(AD, pool=lambda artifacts: [(Mixed(p), idx) for p, idx in AD.pool(artifacts)])
    with pytest.raises(AssertionError, match="pooled row differs from its own"):
        check_enrichment(bad)


def test_the_check_catches_a_config_check_that_accepts_anything():
    bad = _Broken(AD, check_config=lambda config: dict(config))
    with pytest.raises(AssertionError, match="accepts a setting it does not know"):
        check_enrichment(bad)


def test_an_enrichment_a_model_cannot_use_has_no_columns_in_its_view():
    class Picky:
        name, reserved = "picky", ("picky_*",)

        def outputs(self, spec):
            return [Output("picky_value", pa.float64(), "picky_value")]

        def check_model(self, spec, reference=None):
            if spec.task != "regression":
                raise Unusable("picky: regression models only")

    saved = dict(ENRICHMENTS)
    ENRICHMENTS["picky"] = Picky()
    try:
        specs = {s.task: s for s, _ in sample_models(50)}
        # a spec differing only in model id: the caches are keyed by spec
        reg = dataclasses.replace(specs["regression"], model_id="picky_reg")
        binary = dataclasses.replace(specs["binary_classification"], model_id="picky_bin")
        assert "picky_value" in dict(view_columns(reg))
        assert "picky_value" not in dict(view_columns(binary))
        assert "picky_version" in spec_columns(reg) and "picky_version" not in spec_columns(binary)
    finally:
        ENRICHMENTS.clear()
        ENRICHMENTS.update(saved)


def test_switching_on_an_enrichment_the_model_cannot_use_is_refused_before_any_training(tmp_path):
    from enricher.models.artifact import ArtifactStore
    from enricher.models.registry import ModelRegistry

    from enricher.control.plane import ControlPlane
    from enricher.errors import RequestError

    class NeedsLabels:
        name, reserved = "needs_labels", ("needs_labels_*",)

        def outputs(self, spec):
            return [Output("needs_labels_value", pa.float64(), "needs_labels_value")]

        def check_model(self, spec, reference=None):
            if reference is not None and "label" not in reference.names:
                raise Unusable("the reference data has no label column; register it with labels")

        def check_config(self, config):
            return dict(config)

        def check_quality(self, quality, config):
            pass

    saved = dict(ENRICHMENTS)
    ENRICHMENTS["needs_labels"] = NeedsLabels()
    try:
        spec, reference = sample_models(100)[0]
        path = tmp_path / "ref.parquet"
        import pyarrow.parquet as pq

        pq.write_table(reference.drop_columns(["label"]), path)
        registry = ModelRegistry(tmp_path / "registry")
        registry.register("unlabelled", spec.to_json(), path)
        control = ControlPlane(registry, ArtifactStore(tmp_path / "artifacts"))
        with pytest.raises(RequestError) as err:
            control.patch_enrichments("unlabelled", {"anomaly_detection": {"enabled": True},
                                                     "needs_labels": {"enabled": True}})
        assert http_status(err.value) == 400 and err.value.field == "needs_labels.enabled"
        assert "no label column" in str(err.value)
        # nothing applied, not even the part of the PATCH that was fine
        assert not any(t["enabled"] for t in registry.enrichments("unlabelled").values())
        assert registry.status("unlabelled", "anomaly_detection") == {}
        with pytest.raises(SpecError, match="no label column"):  # the registry refuses it too (CLI, scripts)
            registry.set_enrichment("unlabelled", "needs_labels", True)
        pq.write_table(reference, path)  # with labels: fine
        registry.register("unlabelled", spec.to_json(), path)
        control.patch_enrichments("unlabelled", {"needs_labels": {"enabled": True}})
        assert registry.enrichments("unlabelled")["needs_labels"]["enabled"]
        pq.write_table(reference.drop_columns(["label"]), path)
        with pytest.raises(SpecError, match="no label column"):  # a new reference must still allow what is on
            registry.register("unlabelled", spec.to_json(), path)
    finally:
        ENRICHMENTS.clear()
        ENRICHMENTS.update(saved)


def test_explanations_for_a_model_whose_feature_would_take_their_column_are_refused_at_the_patch(tmp_path):
    import pyarrow.parquet as pq
    from enricher.models.artifact import ArtifactStore
    from enricher.models.registry import ModelRegistry

    from enricher.control.plane import ControlPlane
    from enricher.errors import RequestError

    spec, reference = sample_models(100)[0]
    path = tmp_path / "ref.parquet"
    pq.write_table(reference.rename_columns(["output" if c == "x2" else c for c in reference.column_names]), path)
    doc = spec.to_json()
    doc["features"] = [{**f, "name": "output"} if f["name"] == "x2" else f for f in doc["features"]]
    registry = ModelRegistry(tmp_path / "registry")
    registry.register("clash", doc, path)
    control = ControlPlane(registry, ArtifactStore(tmp_path / "artifacts"))
    with pytest.raises(RequestError) as err:
        control.patch_enrichments("clash", {"explainability": {"enabled": True}})
    assert http_status(err.value) == 400 and err.value.field == "explainability.enabled"
    assert "explanation_output" in str(err.value) and "rename the feature" in str(err.value)
    assert not registry.enrichments("clash")["explainability"]["enabled"]
    control.patch_enrichments("clash", {"anomaly_detection": {"enabled": True}})  # what it can use, it may
