"""A thousand models at the speed of one: artifacts held in pools (anomaly detection, explanations)
enrich the rows of many models in one pass, and every value equals the one the model's own artifact gives."""

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from enricher.models import ENRICHMENTS
from enricher.models.artifact import ArtifactStore
from enricher.models.catalog import model_outputs
from enricher.models.enrichment import InferenceBatch, published_parameters, version_column
from enricher.models.reference import normalise
from enricher.models.registry import ModelRegistry
from enricher.models.spec import ModelSpec

from enricher import sample
from enricher.stream.batch import BatchProcessor
from enricher.stream.contract import parse_batch
from enricher.stream.serving import Serving

AD = "anomaly_detection"
EX = "explainability"
BLOB = {AD: "forest.npz", EX: "ensemble.npz"}  # the file of each that holds its trees

OTHER = {"task": "regression", "features": [{"name": "a", "type": "numeric", "nullable": True}, {"name": "b", "type": "numeric"},
                                            {"name": "kind", "type": "categorical"},
                                            {"name": "c", "type": "numeric"}, {"name": "city", "type": "categorical"}]}


def other_reference(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"a": rng.normal(size=n), "b": rng.exponential(size=n) * (seed % 5 + 1),
                     "kind": rng.choice(["x", "y", "z", f"only-{seed}"], size=n, p=[.5, .3, .15, .05]),
                     "c": rng.integers(0, 4, size=n).astype(float),
                     "city": rng.choice([f"c{i}" for i in range(seed % 7 + 3)], size=n),
                     "prediction": rng.normal(size=n)})


def fit(model_id: str, schema: dict, reference: pa.Table, trees: int, name: str = AD):
    spec = ModelSpec.from_json(model_id, schema)
    config = {"n_estimators": trees, "random_state": 3} | ({"max_depth": 3, "min_fidelity": -1} if name == EX else {})
    return spec, ENRICHMENTS[name].fit(spec, normalise(spec, reference), config)


def hostile_batch(spec: ModelSpec, reference: pa.Table, n: int, seed: int) -> InferenceBatch:
    """Rows drawn from the reference with holes: numeric nulls, categorical nulls, categories no
    reference showed, values on and far beyond the thresholds."""
    rng = np.random.default_rng(seed)
    take = reference.take(pa.array(rng.integers(0, reference.num_rows, size=n)))
    columns = {}
    for col in spec.features:
        values = take.column(col.name).combine_chunks()
        if col.numeric:
            v = values.to_numpy(zero_copy_only=False).astype(float)
            v[rng.random(n) < 0.1] *= 1e6
            mask = rng.random(n) < 0.1
            columns[col.name] = pa.array(v, mask=mask)
        else:
            v = np.array(values.to_pylist(), dtype=object)
            v[rng.random(n) < 0.1] = "never-seen"
            v[rng.random(n) < 0.1] = None
            columns[col.name] = pa.array(v.tolist(), pa.string())
    return InferenceBatch(spec, columns, n, prediction=pa.nulls(n, pa.float64()), label=pa.nulls(n, pa.float64()),
                          inference_id=pa.array([str(i) for i in range(n)]),
                          timestamp=pa.array(np.zeros(n, "datetime64[ms]"), pa.timestamp("ms", tz="UTC")))


def test_pooled_scores_equal_each_models_own_on_mixed_layouts_and_forest_sizes():
    models = []  # (spec, artifact, reference)
    for i in range(7):  # the sample's layout, three forest sizes (one of them alone)
        ref = sample.reference_table(600, seed=40 + i)
        models.append((*fit(f"s{i}", sample.SCHEMA, ref, 30 if i == 6 else 10 if i % 3 else 20), ref))
    for i in range(4):  # another layout
        ref = other_reference(500, seed=70 + i)
        models.append((*fit(f"o{i}", OTHER, ref, 10), ref))
    pools = ENRICHMENTS[AD].pool([a for _, a, _ in models])
    # one pool per layout and forest size (the lone one in a pool of its own), every artifact in one
    assert sorted(len(idx) for _, idx in pools) == [1, 2, 4, 4]
    assert sorted(i for _, idx in pools for i in idx) == list(range(len(models)))
    for pool, idx in pools:
        order = [idx[k % len(idx)] for k in (0, 2, 1, 3, 0, 1)]  # a model twice, out of order
        batches = [hostile_batch(models[i][0], models[i][2], 17 + 5 * k, seed=k) for k, i in enumerate(order)]
        member = np.repeat([idx.index(i) for i in order], [b.num_rows for b in batches])
        pooled = pool.transform(InferenceBatch.concat(batches, pool.features), member)["anomaly_score"].to_numpy()
        own = np.concatenate([models[i][1].transform(b)["anomaly_score"].to_numpy() for i, b in zip(order, batches)])
        assert len(pooled) == sum(b.num_rows for b in batches)
        np.testing.assert_allclose(pooled, own, rtol=0, atol=1e-12)
        assert np.all((pooled > 0) & (pooled < 1))


def test_a_pool_holds_each_node_once_and_its_members_score_as_before():
    ref = sample.reference_table(400, seed=1)
    fitted = [fit(f"s{i}", sample.SCHEMA, sample.reference_table(400, seed=i), 10) for i in range(3)]
    batch = hostile_batch(fitted[0][0], ref, 300, seed=9)
    before = [a.transform(batch)["anomaly_score"].to_numpy() for _, a in fitted]
    (pool, _), = ENRICHMENTS[AD].pool([a for _, a in fitted])
    for (_, a), scores in zip(fitted, before):
        for array in (a.forest.feature, a.forest.threshold, a.forest.children, a.forest.value):
            assert np.shares_memory(array, pool.forests.records)
        assert np.array_equal(a.transform(batch)["anomaly_score"].to_numpy(), scores)
    assert pool.forests.nbytes <= 1.1 * sum(16 * len(a.forest.feature) for _, a in fitted)


@pytest.fixture
def world(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    store = ArtifactStore(tmp_path / "artifacts")
    return registry, store, tmp_path


def register(world, model_id: str, schema: dict, reference: pa.Table, name: str = AD):
    registry, _, tmp = world
    path = tmp / f"{model_id}.parquet"
    pq.write_table(reference, path)
    registry.register(model_id, schema, path)
    registry.set_enrichment(model_id, name, True)


def publish(world, model_id: str, schema: dict, reference: pa.Table, trees: int = 10, name: str = AD) -> int:
    registry, store, _ = world
    _, fitted = fit(model_id, schema, reference, trees, name)
    version = store.publish(model_id, name, fitted.to_blobs(), reference.num_rows,
                            published_parameters(fitted)).version
    registry.touch()
    return version


def storage_columns(serving: Serving, model_id: str, name: str) -> dict[str, str]:
    """The enrichment's columns for the model: storage column -> its name in the model's view."""
    outputs = dict(model_outputs(serving.spec(model_id)))[name]
    return {o.storage: o.name for o in outputs} | {version_column(name): version_column(name)}


def scores_by_model(serving: Serving, messages: list[bytes], name: str = AD) -> dict[str, dict | None]:
    """What the stream writes for each model: the enrichment's columns (its version column
    included) by their names in the model's view, read from the rows it would insert; None
    for a model whose columns are all NULL."""
    parsed = parse_batch(messages, [0] * len(messages), list(range(len(messages))), serving.spec, 1 << 20)
    assert not parsed.dead
    table, _ = BatchProcessor(None, serving, None).enrich(parsed, 0)  # as the stream does, layout by layout
    model_of = np.asarray(table.column("model_id").to_pylist())
    result = {}
    for model_id in parsed.models:
        mine = pa.array(model_of == model_id)
        got = {}
        for storage, col in storage_columns(serving, model_id, name).items():
            if storage in table.column_names:
                got[col] = table.column(storage).filter(mine).combine_chunks()
        result[model_id] = got if any(a.null_count < len(a) for a in got.values()) else None
    return result


def own_scores(world, serving: Serving, messages: list[bytes], model_id: str, version: int,
               name: str = AD) -> dict[str, pa.Array]:
    """The model's own artifact, loaded afresh from the store, on the model's rows alone."""
    registry, store, _ = world
    mine = [m for m in messages if orjson.loads(m)["model_id"] == model_id]
    parsed = parse_batch(mine, [0] * len(mine), list(range(len(mine))), serving.spec, 1 << 20)
    spec = registry.get(model_id)
    artifact = store.load(model_id, name, version)
    fitted = ENRICHMENTS[name].load(spec, artifact.manifest, artifact.blobs)
    return fitted.transform(parsed.models[model_id].batch())


def assert_own(got: dict[str, pa.Array], own: dict[str, pa.Array], version: int, why: str = "") -> None:
    """The stream's columns for a model are its own artifact's (to 1e-12, NULL where it gave NULL),
    each row stamped with the artifact's version."""
    for col, want in own.items():
        assert got[col].is_null().equals(want.is_null()), f"{col} {why}"
        np.testing.assert_allclose(got[col].to_numpy(zero_copy_only=False), want.to_numpy(zero_copy_only=False),
                                   rtol=0, atol=1e-12, err_msg=f"{col} {why}")
    versions = [v for v in got[next(c for c in got if c.endswith("_version"))].to_pylist()]
    assert set(versions) == {version}, why


def other_messages(n: int, model_ids: list[str], seed: int) -> list[bytes]:
    """Inferences of OTHER's layout (a regression with two categorical features), some values missing."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        features = {"a": float(rng.normal()), "b": float(rng.exponential()), "kind": str(rng.choice(["x", "y", "w"])),
                    "c": float(rng.integers(0, 4)), "city": str(rng.choice(["c1", "c2", "c9"]))}
        if i % 5 == 0:
            features["a"] = None
        out.append(orjson.dumps({"model_id": model_ids[i % len(model_ids)], "inference_id": f"other-{i}",
                                 "timestamp": 1_796_526_074_610 + i, "features": features,
                                 "prediction": float(rng.normal())}))
    return out


@pytest.mark.parametrize("name", [AD, EX])
def test_the_stream_enriches_a_mixed_piece_through_pools_as_each_model_would_alone(world, name):
    """Models of two layouts in one piece, one enabled but never trained, one whose artifact is
    refused, one swapped to a new version mid-stream: every model's columns are its own artifact's."""
    registry, store, _ = world
    ids = [f"m{i}" for i in range(8)]
    others = ["o0", "o1"]
    for i, m in enumerate(ids):
        register(world, m, sample.SCHEMA, sample.reference_table(500, seed=100 + i), name)
    for i, m in enumerate(others):
        register(world, m, OTHER, other_reference(400, seed=300 + i), name)
        publish(world, m, OTHER, other_reference(400, seed=300 + i), name=name)
    for m in ids[:6]:  # m6: enabled, never trained; m7: its artifact is refused
        publish(world, m, sample.SCHEMA, sample.reference_table(500, seed=100 + ids.index(m)), name=name)
    bad = publish(world, "m7", sample.SCHEMA, sample.reference_table(500, seed=107), name=name)
    store.files.write(store.files.path("m7", name, f"v{bad:06d}", BLOB[name]), b"corrupted")
    served = ids[:6] + others

    serving = Serving(registry, store, min_refresh=0)
    serving.maintain()  # loads every model ahead of its first batch, and pools
    assert all(serving.active(m)[name].pooled is not None for m in served)
    assert serving.active("m6") == {} and serving.active("m7") == {}
    assert serving.active("o0")[name].pooled[0] is not serving.active("m0")[name].pooled[0]  # a pool per layout
    messages, _ = sample.inferences(600, anomalies=12, seed=3, model_id=ids)
    messages += other_messages(200, others, seed=4)

    got = scores_by_model(serving, messages, name)
    for m in served:
        assert_own(got[m], own_scores(world, serving, messages, m, 1, name), 1, m)
    assert got["m6"] is None and got["m7"] is None

    # m2 gets a new version mid-stream: it serves on its own until the next tick pools it
    v2 = publish(world, "m2", sample.SCHEMA, sample.reference_table(500, seed=999), name=name)
    serving.refresh()
    assert serving.active("m2")[name].pooled is None and serving.active("m2")[name].version == v2
    for when in ("before pooling", "after pooling"):
        got = scores_by_model(serving, messages, name)
        for m in served:
            version = v2 if m == "m2" else 1
            assert_own(got[m], own_scores(world, serving, messages, m, version, name), version, f"{m} {when}")
        serving.maintain()
    assert all(serving.active(m)[name].pooled is not None for m in served)


def test_a_pool_that_fails_on_a_batch_hands_each_model_its_own_rows(world, monkeypatch, caplog):
    registry, store, _ = world
    ids = ["p0", "p1", "p2"]
    for i, m in enumerate(ids):
        register(world, m, sample.SCHEMA, sample.reference_table(400, seed=200 + i))
        publish(world, m, sample.SCHEMA, sample.reference_table(400, seed=200 + i))
    serving = Serving(registry, store, min_refresh=0)
    serving.maintain()
    pool = serving.active("p0")[AD].pooled[0]
    assert all(serving.active(m)[AD].pooled[0] is pool for m in ids)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the pool")

    monkeypatch.setattr(pool, "transform", broken)
    messages, _ = sample.inferences(90, seed=8, model_id=ids)
    got = scores_by_model(serving, messages)
    assert "a pool of 3 models failed" in caplog.text
    for m in ids:  # every row still scored, by its own model
        assert_own(got[m], own_scores(world, serving, messages, m, 1), 1, m)
