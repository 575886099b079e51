"""The enriched tables (layout v2) on the real engine (chDB)."""

import pyarrow as pa
import pytest
from enricher.models.registry import ModelRegistry
from enricher.models.spec import ModelSpec

from enricher import sample
from enricher.config import Settings
from enricher.store.clickhouse import FIXED_COLUMNS, EnrichedTables, Schema, connect, quote, view_columns
from enricher.stream.contract import parse_batch
from enricher.stream.enrich import enrich

SPEC = ModelSpec.from_json(sample.MODEL_ID, sample.SCHEMA)
DAY_MS = 86_400_000


@pytest.fixture
def client(tmp_path):
    settings = Settings.from_env(env={}, data_dir=str(tmp_path))
    client = connect(settings)
    yield client
    client.close()


@pytest.fixture
def tables(client):
    return EnrichedTables(client, "enricher")


def rows_for(spec, n=100, **kw):
    msgs, _ = sample.inferences(n, model_id=spec.model_id, **kw)
    return parse_batch(msgs, [0] * n, list(range(n)), {spec.model_id: spec}.get, 1 << 20).models[spec.model_id]


def write(tables, spec, rows, token=None, ingested_at_us=1_700_000_000_000_000):
    tables.ensure_view(spec)
    tables.insert(enrich(rows, {}, ingested_at_us), token)


def count(tables, sql):
    return tables.client.query(sql).result_rows[0][0]


def test_each_model_view_has_the_documented_columns_in_order(tables):
    write(tables, SPEC, rows_for(SPEC))
    described = tables.client.query(f"DESCRIBE enricher.{SPEC.model_id}").result_rows
    names = [r[0] for r in described]
    assert names == [n for n, _ in view_columns(SPEC)]
    assert names[:2] == ["inference_id", "timestamp"]
    assert names[2:14] == sample.NUMERIC + ["region", "sex"]
    explanations = [f"explanation_{f}" for f in sample.NUMERIC + ["region"]]
    assert names[14:] == ["prediction", "label", "label_at", "anomaly_score", "anomaly_detection_version",
                          *explanations, "explanation_base_value", "explanation_output", "explainability_version",
                          "bias_mitigated_prediction", "bias_mitigation_version", "hotspot_id", "hotspots_version",
                          "_ingested_at", "_partition", "_offset"]
    types = {r[0]: r[1] for r in described}
    assert types["timestamp"] == "DateTime64(3, 'UTC')" and types["f0"] == "Nullable(Float64)"
    assert types["region"] == "LowCardinality(Nullable(String))"
    assert types["anomaly_detection_version"] == "Nullable(UInt32)"


def test_storage_is_time_ordered_partitioned_by_month_and_typed_per_slot(tables):
    write(tables, SPEC, rows_for(SPEC, 5))
    engine, sorting, partition = tables.client.query(
        "SELECT engine, sorting_key, partition_key FROM system.tables "
        "WHERE database = 'enricher_store' AND name = 'enriched'").result_rows[0]
    assert (engine, sorting, partition) == ("ReplacingMergeTree", "model_id, timestamp, inference_id",
                                            "toYYYYMM(timestamp)")
    columns = dict(tables.client.query("SELECT name, type FROM system.columns WHERE database = 'enricher_store' "
                                       "AND table = 'enriched'").result_rows)
    assert columns["n9"] == "Nullable(Float64)" and columns["c1"] == "LowCardinality(Nullable(String))"
    assert "n10" not in columns and "c2" not in columns  # only the slots some model uses


def test_values_come_back_as_they_went_in(tables):
    rows = rows_for(SPEC, 20)
    write(tables, SPEC, rows)
    got = tables.client.query(f"SELECT inference_id, f3, region, sex, prediction, label FROM enricher.{SPEC.model_id} "
                              "ORDER BY inference_id").result_rows
    assert [r[0] for r in got] == rows.inference_id.to_pylist()
    assert [r[1] for r in got] == rows.values["f3"].to_pylist()
    assert [r[2] for r in got] == rows.values["region"].to_pylist()
    assert [r[3] for r in got] == rows.values["sex"].to_pylist()
    assert [r[4] for r in got] == rows.prediction.to_pylist()
    assert all(r[5] is None for r in got)


def test_a_retried_insert_with_the_batch_token_adds_nothing_to_storage(tables):
    rows = rows_for(SPEC)
    for _ in range(3):
        write(tables, SPEC, rows, token="inferences|0:0-99|100|abc")
    assert count(tables, "SELECT count() FROM enricher_store.enriched") == 100
    write(tables, SPEC, rows, token="inferences|0:0-99|100|other")  # another batch (token): stored
    assert count(tables, "SELECT count() FROM enricher_store.enriched") == 200


def test_rows_redelivered_in_another_batch_show_once_in_the_view(tables):
    rows = rows_for(SPEC)
    write(tables, SPEC, rows)
    write(tables, SPEC, rows, ingested_at_us=1_700_000_000_000_001)  # a later copy: not the same insert
    c = tables.client
    assert count(tables, "SELECT count() FROM enricher_store.enriched") == 200
    assert c.query(f"SELECT count(), uniqExact(inference_id) FROM enricher.{SPEC.model_id}").result_rows == [(100, 100)]


def test_models_share_storage_but_not_rows(tables):
    other = ModelSpec.from_json("other_model", {**sample.SCHEMA, "task": "multiclass_classification"})
    write(tables, SPEC, rows_for(SPEC, 30))
    msgs = [m.replace(b'"prediction":', b'"prediction":"class_a","p":') for m in
            sample.inferences(40, model_id="other_model")[0]]
    rows = parse_batch(msgs, [0] * 40, list(range(40)), {"other_model": other}.get, 1 << 20).models["other_model"]
    write(tables, other, rows)
    c = tables.client
    assert c.query(f"SELECT count() FROM enricher.{SPEC.model_id}").result_rows == [(30,)]
    assert c.query("SELECT count(), any(prediction), toTypeName(any(prediction)) FROM enricher.other_model"
                   ).result_rows == [(40, "class_a", "Nullable(String)")]


SMALL = {"task": "regression", "features": [{"name": "x", "type": "numeric"}, {"name": "kind", "type": "categorical"}]}


def test_time_window_and_per_feature_reads_return_what_was_written_across_partitions(tables):
    """Two models of different layouts, 90 days of rows (four monthly partitions)."""
    import numpy as np

    from enricher.stream.batch import BatchProcessor

    small = ModelSpec.from_json("small_model", SMALL)
    start = 1_767_225_600_000  # 2026-01-01
    big_rows = rows_for(SPEC, 900, start_ms=start)
    big_rows.timestamp = pa.array(start + np.arange(900) * (DAY_MS // 10), pa.timestamp("ms", tz="UTC"))
    msgs = [f'{{"model_id":"small_model","inference_id":"s{i}","timestamp":{start + i * DAY_MS // 5},'
            f'"features":{{"x":{i / 7},"kind":"k{i % 3}"}},"prediction":{i}}}'.encode() for i in range(450)]
    parsed = parse_batch(msgs + [], [0] * 450, list(range(450)), {"small_model": small}.get, 1 << 20)
    parsed.models[SPEC.model_id] = big_rows
    tables.ensure_view(SPEC)
    tables.ensure_view(small)

    class OneModel:  # BatchProcessor.enrich: both layouts into one insert
        @staticmethod
        def active(model_id):
            return {}
    table, _ = BatchProcessor(Settings.from_env(env={}, data_dir="/tmp"), OneModel, None).enrich(parsed, 0)
    tables.insert(table)
    partitions = tables.client.query("SELECT uniqExact(partition) FROM system.parts WHERE database = "
                                     "'enricher_store' AND table = 'enriched' AND active").result_rows[0][0]
    assert partitions == 3
    c = tables.client
    lo, hi = "2026-02-10 00:00:00", "2026-03-05 00:00:00"
    got = c.query(f"SELECT inference_id, f4, region FROM enricher.{SPEC.model_id} WHERE timestamp >= '{lo}' "
                  f"AND timestamp < '{hi}' ORDER BY timestamp").result_rows
    ts = big_rows.timestamp.cast(pa.int64()).to_numpy()
    lo_ms, hi_ms = (np.datetime64(t).astype("datetime64[ms]").astype(np.int64) for t in (lo, hi))
    keep = np.flatnonzero((ts >= lo_ms) & (ts < hi_ms))
    assert len(got) == len(keep) > 200
    assert [r[0] for r in got] == [big_rows.inference_id[i].as_py() for i in keep]
    assert [r[1] for r in got] == [big_rows.values["f4"][i].as_py() for i in keep]
    assert [r[2] for r in got] == [big_rows.values["region"][i].as_py() for i in keep]
    got = c.query(f"SELECT inference_id, x, kind, prediction FROM enricher.small_model WHERE timestamp >= '{lo}' "
                  f"AND timestamp < '{hi}' ORDER BY timestamp").result_rows
    expect = [(f"s{i}", i / 7, f"k{i % 3}", float(i)) for i in range(450)
              if lo_ms <= start + i * DAY_MS // 5 < hi_ms]
    assert got == expect and len(expect) > 100


def register(registry, schema, folder):
    """Register `evolving` with `schema`, and a reference to match it."""
    import pyarrow.parquet as pq

    cols = schema["features"] + schema.get("attributes", [])
    ref = {c["name"]: (pa.array([1.0, 2.0]) if c["type"] == "numeric" else pa.array(["a", "b"])) for c in cols}
    path = folder / "ref.parquet"
    pq.write_table(pa.table({**ref, "prediction": pa.array([0.0, 1.0])}), path)
    return registry.register("evolving", schema, path)


def small_rows(spec, ids, **features):
    msgs = [f'{{"model_id":"evolving","inference_id":"{i}","timestamp":1767225600000,'
            f'"features":{{{",".join(f"{chr(34)}{k}{chr(34)}:{v!r}" for k, v in features.items())}}},'
            f'"prediction":1}}'.replace("'", '"').encode() for i in ids]
    return parse_batch(msgs, [0] * len(ids), list(range(len(ids))), {"evolving": spec}.get, 1 << 20).models["evolving"]


def test_a_feature_added_and_dropped_keeps_every_value_where_it_was(tables, tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    v1 = register(registry, SMALL, tmp_path)
    write(tables, v1, small_rows(v1, ["a1", "a2"], x=1.5, kind="k"))
    # gains y; then loses x (y keeps its slot, x's stays reserved); then x comes back
    v2 = register(registry, {**SMALL, "features": SMALL["features"] + [{"name": "y", "type": "numeric"}]},
                 tmp_path)
    write(tables, v2, small_rows(v2, ["b1"], x=2.5, kind="k", y=9.0))
    c = tables.client
    assert c.query("SELECT inference_id, x, y FROM enricher.evolving ORDER BY inference_id").result_rows == [
        ("a1", 1.5, None), ("a2", 1.5, None), ("b1", 2.5, 9.0)]
    v3 = register(registry, {**SMALL, "features": [{"name": "kind", "type": "categorical"},
                                        {"name": "y", "type": "numeric"}]}, tmp_path)
    assert v3.storage_columns == {"kind": "c0", "y": "n1"}
    write(tables, v3, small_rows(v3, ["c1"], kind="k", y=4.0))
    described = [r[0] for r in c.query("DESCRIBE enricher.evolving").result_rows]
    assert "x" not in described and "y" in described
    assert c.query("SELECT inference_id, y FROM enricher.evolving ORDER BY inference_id").result_rows == [
        ("a1", None), ("a2", None), ("b1", 9.0), ("c1", 4.0)]
    v4 = register(registry, {**SMALL, "features": SMALL["features"] + [{"name": "y", "type": "numeric"}]},
                 tmp_path)
    assert v4.storage_columns == {"x": "n0", "kind": "c0", "y": "n1"}
    tables.ensure_view(v4)
    assert c.query("SELECT inference_id, x FROM enricher.evolving ORDER BY inference_id").result_rows == [
        ("a1", 1.5), ("a2", 1.5), ("b1", 2.5), ("c1", None)]
    # a type change: x becomes categorical, in a categorical slot of its own
    v5 = register(registry, {**SMALL, "features": [{"name": "x", "type": "categorical"},
                                        {"name": "kind", "type": "categorical"}]}, tmp_path)
    assert v5.storage_columns == {"x": "c1", "kind": "c0"}


def test_a_release_that_adds_an_enrichment_column_adds_it_to_an_existing_table(tables):
    write(tables, SPEC, rows_for(SPEC, 10))
    tables.client.command("ALTER TABLE enricher_store.enriched DROP COLUMN anomaly_score")  # as an older release made it
    again = EnrichedTables(tables.client, "enricher", Schema())
    write(again, SPEC, rows_for(SPEC, 10, id_prefix="new"))
    assert count(tables, f"SELECT countIf(anomaly_score IS NULL) FROM enricher.{SPEC.model_id}") == 20


def test_retention_drops_rows_older_than_the_setting(client):
    import time

    now = int(time.time() * 1000)
    tables = EnrichedTables(client, "enricher", retention_days=30)
    write(tables, SPEC, rows_for(SPEC, 10, start_ms=now - 40 * DAY_MS, id_prefix="old"))
    write(tables, SPEC, rows_for(SPEC, 10, start_ms=now - 5 * DAY_MS, id_prefix="new"))
    client.command("OPTIMIZE TABLE enricher_store.enriched FINAL")
    assert client.query(f"SELECT DISTINCT substring(inference_id, 1, 3) FROM enricher.{SPEC.model_id}"
                        ).result_rows == [("new",)]
    # a later setting changes the table's TTL, and 0 removes it
    EnrichedTables(client, "enricher", Schema(), retention_days=3).ensure_table()
    client.command("OPTIMIZE TABLE enricher_store.enriched FINAL")
    assert count(tables, f"SELECT count() FROM enricher.{SPEC.model_id}") == 0
    EnrichedTables(client, "enricher", Schema(), retention_days=0).ensure_table()
    assert "TTL" not in client.query("SELECT engine_full FROM system.tables WHERE name = 'enriched'").result_rows[0][0]


def test_dropping_a_model_deletes_its_rows_and_view_only(tables):
    other = ModelSpec.from_json("other_model", sample.SCHEMA)
    write(tables, SPEC, rows_for(SPEC, 30))
    write(tables, other, rows_for(other, 20))
    tables.drop_model(SPEC.model_id)
    assert count(tables, f"SELECT count() FROM enricher_store.enriched WHERE model_id = '{SPEC.model_id}'") == 0
    assert count(tables, "SELECT count() FROM enricher.other_model") == 20
    assert count(tables, f"SELECT count() FROM system.tables WHERE database = 'enricher' "
                         f"AND name = '{SPEC.model_id}'") == 0


def test_storage_columns_line_up_with_the_arrow_rows():
    table = enrich(rows_for(SPEC, 5), {}, 0)
    # the table's own columns and the model's slots; no enrichment is serving, so none of
    # their columns is written (the insert leaves them NULL: the view shows NULL)
    assert table.column_names == list(FIXED_COLUMNS) + [f"n{i}" for i in range(10)] + ["c0", "c1"]
    assert table.schema.field("n0").type == pa.float64()
    # with anomaly detection serving: its columns, and still none of the explanations'
    from enricher.models import ENRICHMENTS
    from enricher.models.reference import normalise

    from enricher.stream.serving import Active

    fitted = ENRICHMENTS["anomaly_detection"].fit(SPEC, normalise(SPEC, sample.reference_table(500)),
                                                  {"n_estimators": 5})
    table = enrich(rows_for(SPEC, 5), {"anomaly_detection": Active("anomaly_detection", 3, fitted)}, 0)
    assert table.column_names[-2:] == ["anomaly_score", "anomaly_detection_version"]
    assert table.column("anomaly_detection_version").to_pylist() == [3] * 5
    assert not any(c.startswith("explanation") for c in table.column_names)


@pytest.mark.parametrize("bad", ["a`b", "x; DROP TABLE y", "", "1; --", "a b"])
def test_identifiers_that_are_not_plain_names_never_reach_sql(bad):
    with pytest.raises(ValueError, match="refusing identifier"):
        quote(bad)


def test_the_database_setting_is_validated():
    with pytest.raises(Exception, match="ENRICHER_CLICKHOUSE_DATABASE"):
        Settings.from_env(env={"ENRICHER_CLICKHOUSE_DATABASE": "x`; drop"})


def test_models_stored_together_keep_their_own_ids_values_and_enrichment_versions(tables):
    import numpy as np
    import pyarrow as pa

    from enricher.stream.enrich import enrich_many
    from enricher.stream.serving import Active

    class Constant:  # an enrichment stand-in with a known output: the layout code is under test here
        def __init__(self, value):
            self.value = value

        def transform(self, batch):
            return {"anomaly_score": pa.array(np.full(batch.num_rows, self.value))}

    specs = [ModelSpec.from_json(m, sample.SCHEMA) for m in ("m_one", "m_two", "m_three")]
    parts = [(rows_for(specs[0], 5), {"anomaly_detection": Active("anomaly_detection", 3, Constant(0.25))}),
             (rows_for(specs[1], 2), {}),
             (rows_for(specs[2], 4), {"anomaly_detection": Active("anomaly_detection", 7, Constant(0.75))})]
    table = enrich_many(parts, 0)
    assert table.column("model_id").to_pylist() == ["m_one"] * 5 + ["m_two"] * 2 + ["m_three"] * 4
    assert table.column("anomaly_score").to_pylist() == [0.25] * 5 + [None] * 2 + [0.75] * 4
    assert table.column("anomaly_detection_version").to_pylist() == [3] * 5 + [None] * 2 + [7] * 4
    assert table.column("n0").to_pylist() == sum((rows.values["f0"].to_pylist() for rows, _ in parts), [])
