"""A thousand models at the speed of one: anomaly artifacts held in pools score the rows of
many models in one pass, and every score equals the one the model's own artifact gives."""

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from enricher.models import ENRICHMENTS
from enricher.models.artifact import ArtifactStore
from enricher.models.enrichment import InferenceBatch
from enricher.models.reference import normalise
from enricher.models.registry import ModelRegistry
from enricher.models.spec import ModelSpec

from enricher import sample
from enricher.stream.contract import parse_batch
from enricher.stream.enrich import enrich_many
from enricher.stream.serving import Serving

AD = "anomaly_detection"

OTHER = {"task": "regression", "features": [{"name": "a", "type": "numeric"}, {"name": "b", "type": "numeric"},
                                            {"name": "kind", "type": "categorical"},
                                            {"name": "c", "type": "numeric"}, {"name": "city", "type": "categorical"}]}


def other_reference(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"a": rng.normal(size=n), "b": rng.exponential(size=n) * (seed % 5 + 1),
                     "kind": rng.choice(["x", "y", "z", f"only-{seed}"], size=n, p=[.5, .3, .15, .05]),
                     "c": rng.integers(0, 4, size=n).astype(float),
                     "city": rng.choice([f"c{i}" for i in range(seed % 7 + 3)], size=n),
                     "prediction": rng.normal(size=n)})


def fit(model_id: str, schema: dict, reference: pa.Table, trees: int):
    spec = ModelSpec.from_json(model_id, schema)
    return spec, ENRICHMENTS[AD].fit(spec, normalise(spec, reference), {"n_estimators": trees, "random_state": 3})


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


def concat(batches: list[InferenceBatch], features: list[str]) -> InferenceBatch:
    """Batches of several models one after the other, as the stream hands them to a pool."""
    def joined(get):
        return pa.concat_arrays([get(b) for b in batches])
    return InferenceBatch(batches[0].spec, {f: joined(lambda b, f=f: b.columns[f]) for f in features},
                          sum(b.num_rows for b in batches), prediction=joined(lambda b: b.prediction),
                          label=joined(lambda b: b.label), inference_id=joined(lambda b: b.inference_id),
                          timestamp=joined(lambda b: b.timestamp))


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
        pooled = pool.transform(concat(batches, pool.features), member)["anomaly_score"].to_numpy()
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


def register(world, model_id: str, schema: dict, reference: pa.Table):
    registry, _, tmp = world
    path = tmp / f"{model_id}.parquet"
    pq.write_table(reference, path)
    registry.register(model_id, schema, path)
    registry.set_enrichment(model_id, AD, True)


def publish(world, model_id: str, schema: dict, reference: pa.Table, trees: int = 10) -> int:
    registry, store, _ = world
    _, fitted = fit(model_id, schema, reference, trees)
    version = store.publish(model_id, AD, fitted.to_blobs(), reference.num_rows, fitted.parameters).version
    registry.touch()
    return version


def scores_by_model(serving: Serving, messages: list[bytes]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """What the stream writes for each model: (anomaly_score, its version column), by model,
    read from the rows it would insert (None where a model's column is all NULL)."""
    parsed = parse_batch(messages, [0] * len(messages), list(range(len(messages))), serving.spec, 1 << 20)
    assert not parsed.dead
    table = enrich_many([(rows, serving.active(m)) for m, rows in parsed.models.items()], 0)
    model_of = np.asarray(table.column("model_id").to_pylist())
    result = {}
    for model_id in parsed.models:
        mine = pa.array(model_of == model_id)
        got = []
        for col in ("anomaly_score", "anomaly_detection_version"):
            arr = table.column(col).filter(mine) if col in table.column_names else None
            got.append(None if arr is None or arr.null_count == len(arr) else arr.to_numpy())
        result[model_id] = tuple(got)
    return result


def own_scores(world, serving: Serving, messages: list[bytes], model_id: str, version: int) -> np.ndarray:
    """The model's own artifact, loaded afresh from the store, on the model's rows alone."""
    registry, store, _ = world
    mine = [m for m in messages if orjson.loads(m)["model_id"] == model_id]
    parsed = parse_batch(mine, [0] * len(mine), list(range(len(mine))), serving.spec, 1 << 20)
    spec = registry.get(model_id)
    artifact = store.load(model_id, AD, version)
    fitted = ENRICHMENTS[AD].load(spec, artifact.manifest, artifact.blobs)
    return fitted.transform(parsed.models[model_id].batch())["anomaly_score"].to_numpy()


def test_the_stream_scores_a_mixed_piece_through_pools_as_each_model_would_alone(world):
    registry, store, _ = world
    ids = [f"m{i}" for i in range(8)]
    for i, m in enumerate(ids):
        register(world, m, sample.SCHEMA, sample.reference_table(500, seed=100 + i))
    for m in ids[:6]:  # m6: enabled, never trained; m7: its artifact is refused
        publish(world, m, sample.SCHEMA, sample.reference_table(500, seed=100 + ids.index(m)))
    bad = publish(world, "m7", sample.SCHEMA, sample.reference_table(500, seed=107))
    store.files.write(store.files.path("m7", AD, f"v{bad:06d}", "forest.npz"), b"corrupted")

    serving = Serving(registry, store, min_refresh=0)
    serving.maintain()  # loads every model ahead of its first batch, and pools
    assert all(serving.active(m)[AD].pooled is not None for m in ids[:6])
    assert serving.active("m6") == {} and serving.active("m7") == {}
    messages, _ = sample.inferences(600, anomalies=12, seed=3, model_id=ids)

    got = scores_by_model(serving, messages)
    for m in ids[:6]:
        np.testing.assert_allclose(got[m][0], own_scores(world, serving, messages, m, 1), rtol=0, atol=1e-12)
        assert set(got[m][1]) == {1}
    assert got["m6"] == (None, None) and got["m7"] == (None, None)

    # m2 gets a new version mid-stream: it serves on its own until the next tick pools it
    v2 = publish(world, "m2", sample.SCHEMA, sample.reference_table(500, seed=999))
    serving.refresh()
    assert serving.active("m2")[AD].pooled is None and serving.active("m2")[AD].version == v2
    for when in ("before pooling", "after pooling"):
        got = scores_by_model(serving, messages)
        for m in ids[:6]:
            version = v2 if m == "m2" else 1
            np.testing.assert_allclose(got[m][0], own_scores(world, serving, messages, m, version),
                                       rtol=0, atol=1e-12, err_msg=f"{m} {when}")
            assert set(got[m][1]) == {version}
        serving.maintain()
    assert all(serving.active(m)[AD].pooled is not None for m in ids[:6])


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
        np.testing.assert_allclose(got[m][0], own_scores(world, serving, messages, m, 1), rtol=0, atol=1e-12)
        assert set(got[m][1]) == {1}
