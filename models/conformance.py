"""The conformance check every enrichment passes, like scikit-learn's `check_estimator`.

    from enricher.models.conformance import check_enrichment
    check_enrichment(MyEnrichment())          # raises AssertionError saying what is wrong

It runs the enrichment the way the engine will: its config check, its model
requirements on models of every task, its declared outputs, fit on reference
data, publish and load through the verified artifact store, transform, and
the properties the stream relies on. The suite runs it on every enrichment in
`models.ENRICHMENTS` (tests/test_conformance.py), so a new one is checked the
moment it is registered.

What the stream relies on, and why each is checked:
- outputs are declared per model, named (in the view and in storage) inside
  what the enrichment reserves, so no feature and no other enrichment can
  collide with them, of a type the store has;
- the artifact survives the store: what `load` rebuilds from verified bytes
  transforms exactly as the fitted object did (workers never see the fitted
  object, only the bytes);
- a row's values do not depend on the other rows of its batch: the stream cuts
  batches anywhere (by size, time, partition, model), so transforming a slice
  must give that slice of the whole batch's values; an empty batch gives empty
  columns;
- values are finite (NULL where not computed) and inside declared bounds;
- where it pools (`pool`), each artifact is in one pool at most, and a pool
  gives the rows of several models, mixed in one batch, what each model's own
  artifact gives them.
"""

from __future__ import annotations

import json
import re
import tempfile

import numpy as np
import pyarrow as pa

from .artifact import ArtifactStore
from .catalog import checked_output, out_of_bounds
from .enrichment import (
    OUTPUT_TYPES,
    Enrichment,
    InferenceBatch,
    Unusable,
    published_parameters,
    reserves,
)
from .reference import normalise
from .spec import ModelSpec

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def sample_models(rows: int = 1500, seed: int = 3) -> list[tuple[ModelSpec, pa.Table]]:
    """Models of every task with numeric, categorical and sensitive columns, and
    normalised reference data whose prediction depends on the features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    region = rng.choice(["north", "south", "east"], size=rows)
    group = rng.choice(["a", "b"], size=rows)
    signal = x[:, 0] - 0.5 * x[:, 1] + 0.8 * (region == "east")
    features = [{"name": "x0", "type": "numeric"}, {"name": "x1", "type": "numeric"},
                {"name": "x2", "type": "numeric"}, {"name": "region", "type": "categorical"}]
    attributes = [{"name": "group", "type": "categorical", "sensitive": True}]
    base = {"x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2], "region": region, "group": group}
    score = 1 / (1 + np.exp(-signal))
    classes = np.array(["low", "mid", "high"])[np.digitize(signal, [-0.5, 0.5])]
    docs = [
        ("sample_regression", {"task": "regression"}, {"prediction": signal, "label": signal + rng.normal(0, .1, rows)}),
        ("sample_binary", {"task": "binary_classification"},
         {"prediction": score, "label": (rng.random(rows) < score).astype(float)}),
        ("sample_multiclass", {"task": "multiclass_classification"}, {"prediction": classes, "label": classes}),
    ]
    out = []
    for model_id, schema, outputs in docs:
        spec = ModelSpec.from_json(model_id, {**schema, "features": features, "attributes": attributes})
        out.append((spec, normalise(spec, pa.table({**base, **outputs}))))
    return out


def check_enrichment(enrichment: Enrichment, models: list[tuple[ModelSpec, pa.Table]] | None = None) -> list[str]:
    """Run every check; returns the ids of the sample models the enrichment could
    use (it must be able to use at least one). Raises AssertionError on the first failure."""
    name = enrichment.name
    assert isinstance(name, str) and _IDENT.match(name), f"name {name!r}: a plain identifier"
    assert isinstance(enrichment.reserved, tuple) and enrichment.reserved, \
        f"{name}: `reserved` must be a non-empty tuple of view column names or prefixes ('x_*')"
    defaults = enrichment.check_config({})
    assert isinstance(defaults, dict), f"{name}.check_config({{}}) must return the defaults"
    try:
        enrichment.check_config({"no_such_setting_at_all": 1})
    except (ValueError, TypeError) as exc:
        assert "no_such_setting_at_all" in str(exc), f"{name}: an unknown setting's error must name it"
    else:
        raise AssertionError(f"{name}.check_config accepts a setting it does not know")

    used, served = [], []
    for spec, reference in models or sample_models():
        try:
            enrichment.check_model(spec, reference.schema)
        except Unusable as exc:
            assert str(exc).strip(), f"{name}: refusing {spec.task} must say why"
            continue
        used.append(spec.model_id)
        _check_outputs(enrichment, spec)
        served.append((spec, _check_fitted(enrichment, spec, reference, defaults)))
    assert used, f"{name}: no sample model could use it"
    if getattr(enrichment, "pool", None) is not None:
        _check_pool(enrichment, served, models or sample_models(), defaults)
    return used


def _check_outputs(enrichment: Enrichment, spec: ModelSpec) -> None:
    name = enrichment.name
    outputs = list(enrichment.outputs(spec))
    assert outputs, f"{name}: declares no output for {spec.model_id}"
    assert outputs == list(enrichment.outputs(spec)), f"{name}.outputs must be the same on every call"
    names = [o.name for o in outputs]
    storage = [o.storage for o in outputs]
    assert len(set(names)) == len(names), f"{name}: an output name is declared twice: {names}"
    assert len(set(storage)) == len(storage), f"{name}: two outputs share a storage column: {storage}"
    slot_like = set(spec.storage_columns.values())
    for out in outputs:
        assert reserves(enrichment, out.name), \
            f"{name}: output {out.name!r} is not among the names it reserves {enrichment.reserved}"
        assert _IDENT.match(out.storage) and out.storage not in slot_like and \
            not re.match(r"^[nc]\d+$", out.storage), f"{name}: storage column {out.storage!r} is not its own"
        assert out.type in OUTPUT_TYPES, f"{name}.{out.name}: type {out.type} is not one the store has"
        # Its storage name reserved too: no two enrichments can then share a storage column.
        assert reserves(enrichment, out.storage), \
            f"{name}: storage column {out.storage!r} is not among the names it reserves"


def _check_fitted(enrichment: Enrichment, spec: ModelSpec, reference: pa.Table, config: dict) -> None:
    name = enrichment.name
    fitted = enrichment.fit(spec, reference, config)
    assert isinstance(fitted.parameters, dict), f"{name}: the fitted artifact's parameters must be a dict"
    assert isinstance(fitted.quality, dict), f"{name}: the fitted artifact's quality must be a dict"
    json.dumps(published_parameters(fitted))  # the manifest is JSON
    enrichment.check_quality(fitted.quality, config)  # the sample models are easy: the bar must pass
    blobs = fitted.to_blobs()
    assert blobs and all(isinstance(k, str) and isinstance(v, bytes) for k, v in blobs.items()), \
        f"{name}.to_blobs must give file name -> bytes"
    with tempfile.TemporaryDirectory() as root:
        store = ArtifactStore(root)
        store.publish(spec.model_id, name, blobs, reference.num_rows, published_parameters(fitted))
        artifact = store.load(spec.model_id, name)  # verified, as a worker loads it
        loaded = enrichment.load(spec, artifact.manifest, artifact.blobs)

    batch = InferenceBatch.from_reference(spec, reference)
    n = batch.num_rows
    whole = checked_output(name, spec, fitted.transform(batch), n)
    again = checked_output(name, spec, loaded.transform(batch), n)
    for col, arr in whole.items():
        _assert_same(arr, again[col], f"{name}.{col}: the loaded artifact transforms differently")
    wrong = out_of_bounds(name, spec, whole)  # what the training run's validate step refuses
    assert wrong is None, wrong
    cut = n // 3
    part = checked_output(name, spec, loaded.transform(batch.slice(cut, 97)), 97)
    for col, arr in part.items():
        _assert_same(arr, whole[col].slice(cut, 97),
                     f"{name}.{col}: a row's value depends on the other rows of its batch")
    empty = checked_output(name, spec, loaded.transform(batch.slice(0, 0)), 0)
    assert all(len(a) == 0 for a in empty.values()), f"{name}: an empty batch must give empty columns"
    return loaded


def _check_pool(enrichment: Enrichment, served: list, models: list, config: dict) -> None:
    """Each model twice (fitted on each half of its reference: two artifacts of one layout),
    pooled; every pool's rows of one layout, mixed in one batch, against each artifact alone."""
    name = enrichment.name
    references = dict((spec.model_id, reference) for spec, reference in models)
    members = []  # (spec, artifact, batch)
    for spec, loaded in served:
        reference = references[spec.model_id]
        half = reference.num_rows // 2
        other = enrichment.fit(spec, reference.slice(half), config)
        batch = InferenceBatch.from_reference(spec, reference)
        members += [(spec, loaded, batch.slice(0, 150)), (spec, other, batch.slice(half, 130))]
    own = [checked_output(name, spec, a.transform(b), b.num_rows) for spec, a, b in members]
    pools = enrichment.pool([a for _, a, _ in members])
    placed = [i for _, idx in pools for i in idx]
    assert len(placed) == len(set(placed)) and set(placed) <= set(range(len(members))), \
        f"{name}.pool: each artifact in one pool at most, given by its position"
    for pool, idx in pools:
        layouts: dict[tuple, list[int]] = {}  # the stream hands a pool one layout's rows at a time
        for k, i in enumerate(idx):
            layouts.setdefault(members[i][0].layout, []).append(k)
        for ks in layouts.values():
            order = ks[::-1] + ks  # out of order, each member in two runs
            batches = [members[idx[k]][2] for k in order]
            mixed = InferenceBatch.concat(batches, pool.features)
            member = np.repeat(np.asarray(order, np.intp), [b.num_rows for b in batches])
            out = checked_output(name, members[idx[order[0]]][0], pool.transform(mixed, member), mixed.num_rows)
            at = 0
            for k, b in zip(order, batches):
                for col, arr in own[idx[k]].items():
                    _assert_same(out[col].slice(at, b.num_rows), arr,
                                 f"{name}.pool: {col} of a pooled row differs from its own artifact's")
                at += b.num_rows


def _assert_same(a: pa.Array, b: pa.Array, message: str) -> None:
    assert a.null_count == b.null_count and a.is_null().equals(b.is_null()), message
    if pa.types.is_floating(a.type):
        x = a.fill_null(0).to_numpy(zero_copy_only=False)
        y = b.fill_null(0).to_numpy(zero_copy_only=False)
        assert np.allclose(x, y, rtol=1e-12, atol=1e-12), message
    else:
        assert a.equals(b), message
