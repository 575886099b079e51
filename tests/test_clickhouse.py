"""The enriched tables on the real engine (chDB)."""

import pyarrow as pa
import pytest

from enricher import sample
from enricher.clickhouse import STORE_COLUMNS, EnrichedTables, connect, quote, view_columns
from enricher.config import Settings
from enricher.contract import parse_batch
from enricher.enrich import enrich
from models.spec import ModelSpec

SPEC = ModelSpec.from_json(sample.MODEL_ID, sample.SCHEMA)


@pytest.fixture
def tables(tmp_path):
    settings = Settings.from_env(env={}, data_dir=str(tmp_path))
    client = connect(settings)
    yield EnrichedTables(client, "enricher")
    client.close()


def rows_for(spec, n=100, **kw):
    msgs, _ = sample.inferences(n, model_id=spec.model_id, **kw)
    return parse_batch(msgs, [0] * n, list(range(n)), {spec.model_id: spec}.get, 1 << 20).models[spec.model_id]


def write(tables, spec, rows):
    tables.ensure_view(spec)
    tables.insert(enrich(rows, {}, 1_700_000_000_000_000))


def test_each_model_view_has_the_documented_columns_in_order(tables):
    write(tables, SPEC, rows_for(SPEC))
    described = tables.client.query(f"DESCRIBE enricher.{SPEC.model_id}").result_rows
    names = [r[0] for r in described]
    assert names == [n for n, _ in view_columns(SPEC)]
    assert names[:2] == ["inference_id", "timestamp"]
    assert names[2:14] == sample.NUMERIC + ["region", "sex"]
    assert names[14:] == ["prediction", "label", "anomaly_score", "anomaly_detection_version",
                          "_ingested_at", "_partition", "_offset"]
    types = {r[0]: r[1] for r in described}
    assert types["timestamp"] == "DateTime64(3, 'UTC')" and types["f0"] == "Nullable(Float64)"
    assert types["region"] == "Nullable(String)" and types["anomaly_detection_version"] == "Nullable(UInt32)"


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


def test_a_batch_written_twice_shows_once_in_the_view(tables):
    rows = rows_for(SPEC)
    write(tables, SPEC, rows)
    write(tables, SPEC, rows)
    c = tables.client
    assert c.query("SELECT count() FROM enricher_store.inferences").result_rows == [(200,)]
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


def test_a_model_that_gains_a_feature_shows_null_for_older_rows(tables):
    write(tables, SPEC, rows_for(SPEC))
    wider = ModelSpec.from_json(SPEC.model_id, {**sample.SCHEMA, "attributes": sample.SCHEMA["attributes"] + [
        {"name": "age_band", "type": "categorical"}]})
    tables.ensure_view(wider)
    c = tables.client
    assert c.query(f"SELECT count(), countIf(age_band IS NULL) FROM enricher.{SPEC.model_id}").result_rows == [(100, 100)]


def test_storage_columns_line_up_with_the_arrow_rows():
    table = enrich(rows_for(SPEC, 5), {}, 0)
    assert table.column_names == list(STORE_COLUMNS)
    assert table.schema.field("numeric").type == pa.map_(pa.string(), pa.float64())


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

    from enricher.enrich import enrich_many
    from enricher.serving import Active

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
    f0 = [dict(m)["f0"] for m in table.column("numeric").to_pylist()]
    assert f0 == sum((rows.values["f0"].to_pylist() for rows, _ in parts), [])
