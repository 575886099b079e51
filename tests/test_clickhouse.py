"""The enriched tables on the real engine (chDB)."""

import pyarrow as pa
import pytest

from enricher import sample
from enricher.clickhouse import EnrichedTables, connect, quote, table_columns
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


def test_layout_has_the_documented_columns_in_order():
    names = list(table_columns(SPEC))
    assert names[:2] == ["inference_id", "timestamp"]
    assert names[2:13] == sample.NUMERIC + ["region"]
    assert names[13:] == ["sex", "prediction", "label", "anomaly_score", "anomaly_detection_version",
                          "_ingested_at", "_partition", "_offset"]


def test_a_batch_written_twice_shows_once_in_the_view(tables):
    layout = tables.ensure(SPEC)
    table = enrich(rows_for(SPEC), {}, layout, 1_700_000_000_000_000)
    tables.insert(SPEC, table)
    tables.insert(SPEC, table)
    c = tables.client
    assert c.query(f"SELECT count() FROM enricher_store.{SPEC.model_id}").result_rows == [(200,)]
    assert c.query(f"SELECT count(), uniqExact(inference_id) FROM enricher.{SPEC.model_id}").result_rows == [(100, 100)]
    types = dict(c.query("SELECT name, type FROM system.columns WHERE database='enricher_store' "
                         "AND table={t:String}", parameters={"t": SPEC.model_id}).result_rows)
    assert types["timestamp"] == "DateTime64(3, 'UTC')"
    assert types["region"] == "LowCardinality(String)"
    assert types["sex"] == "LowCardinality(Nullable(String))"
    assert types["anomaly_score"] == "Nullable(Float64)"
    assert types["anomaly_detection_version"] == "Nullable(UInt32)"


def test_a_model_that_gains_a_feature_gets_the_column_without_losing_rows(tables):
    tables.ensure(SPEC)
    tables.insert(SPEC, enrich(rows_for(SPEC), {}, tables.ensure(SPEC), 1))
    wider = ModelSpec.from_json(SPEC.model_id, {**sample.SCHEMA, "attributes": sample.SCHEMA["attributes"] + [
        {"name": "age_band", "type": "categorical"}]})
    tables.ensure(wider)
    c = tables.client
    assert c.query(f"SELECT count(), countIf(age_band IS NULL) FROM enricher.{SPEC.model_id}").result_rows == [(100, 100)]


@pytest.mark.parametrize("bad", ["a`b", "x; DROP TABLE y", "", "1; --", "a b"])
def test_identifiers_that_are_not_plain_names_never_reach_sql(bad):
    with pytest.raises(ValueError, match="refusing identifier"):
        quote(bad)


def test_the_database_setting_is_validated():
    with pytest.raises(Exception, match="ENRICHER_CLICKHOUSE_DATABASE"):
        Settings.from_env(env={"ENRICHER_CLICKHOUSE_DATABASE": "x`; drop"})
