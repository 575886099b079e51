"""Upgrading from layout v1 (an earlier release's table) keeps every row."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from enricher.models.registry import ModelRegistry

from enricher import sample
from enricher.cli import main
from enricher.config import Settings
from enricher.store.clickhouse import EnrichedTables, connect
from enricher.store.migrate import migrate

# The v1 storage table exactly as the release before 2026-12 created it.
V1_DDL = """CREATE TABLE enricher_store.inferences (
  model_id LowCardinality(String), inference_id String, timestamp DateTime64(3, 'UTC'),
  numeric Map(LowCardinality(String), Nullable(Float64)), categorical Map(LowCardinality(String), Nullable(String)),
  prediction Nullable(Float64), prediction_class LowCardinality(Nullable(String)), label Nullable(Float64),
  label_class LowCardinality(Nullable(String)), anomaly_score Nullable(Float64),
  anomaly_detection_version Nullable(UInt32), _ingested_at DateTime64(6, 'UTC'), _partition UInt32, _offset UInt64
) ENGINE = ReplacingMergeTree(_ingested_at) ORDER BY (model_id, inference_id)"""


@pytest.fixture
def v1_store(tmp_path):
    settings = Settings.from_env(env={}, data_dir=str(tmp_path))
    registry = ModelRegistry(settings.registry_dir)
    ref = tmp_path / "ref.parquet"
    pq.write_table(pa.table({**{n: pa.array([0.0, 1.0]) for n in sample.NUMERIC}, "region": ["a", "b"],
                             "prediction": [0.1, 0.9]}), ref)
    registry.register(sample.MODEL_ID, sample.SCHEMA, ref)
    client = connect(settings)
    client.command("CREATE DATABASE enricher_store")
    client.command(V1_DDL)
    numeric = "map(" + ", ".join(f"'{n}', number * {k + 1} / 10" for k, n in enumerate(sample.NUMERIC)) + ")"
    # 3,000 inferences over 90 days; 500 of them written twice (the later copy wins in v1's view),
    # some labelled and scored; plus 10 rows of a model no longer registered.
    client.command(f"""INSERT INTO enricher_store.inferences SELECT '{sample.MODEL_ID}', concat('v1-', toString(number)),
        toDateTime64('2026-08-01 00:00:00', 3, 'UTC') + number * 2592, {numeric},
        map('region', if(number % 2 = 0, 'north', 'south'), 'sex', 'f'), number / 3000, NULL,
        if(number % 3 = 0, number % 2, NULL), NULL, if(number % 5 = 0, 0.5, NULL),
        if(number % 5 = 0, 1, NULL), toDateTime64('2026-11-01 00:00:00', 6, 'UTC'), 0, number FROM numbers(3000)""")
    client.command(f"""INSERT INTO enricher_store.inferences SELECT '{sample.MODEL_ID}', concat('v1-', toString(number)),
        toDateTime64('2026-08-01 00:00:00', 3, 'UTC') + number * 2592, {numeric},
        map('region', 'east', 'sex', 'm'), number / 3000, NULL, NULL, NULL, 0.9, 2,
        toDateTime64('2026-11-02 00:00:00', 6, 'UTC'), 0, number FROM numbers(500)""")
    client.command("""INSERT INTO enricher_store.inferences SELECT 'gone_model', toString(number),
        now64(3), map(), map(), 1, NULL, NULL, NULL, NULL, NULL, now64(6), 0, number FROM numbers(10)""")
    yield settings, registry, client
    client.close()


def test_migrate_copies_every_v1_row_into_the_model_view_with_its_values(v1_store):
    settings, registry, client = v1_store
    tables = EnrichedTables.from_settings(client, settings)
    report = migrate(tables, registry)
    assert report.rows == {sample.MODEL_ID: 3000} and report.unregistered == ["gone_model"]
    assert report.legacy == "kept"  # a model's rows are still only there
    view = f"enricher.{sample.MODEL_ID}"
    got = client.query(f"SELECT count(), uniqExact(inference_id), countIf(region = 'east'), "
                       f"countIf(anomaly_detection_version = 2), countIf(label IS NOT NULL), "
                       f"countIf(label_at = timestamp), min(timestamp), max(timestamp) FROM {view}").result_rows[0]
    assert got[:6] == (3000, 3000, 500, 500, 833, 833)  # the later copies had no label
    assert (str(got[6]), str(got[7])) == ("2026-08-01 00:00:00", "2026-10-29 23:16:48")
    row = client.query(f"SELECT f0, f9, region, sex, prediction, label, anomaly_score, _offset FROM {view} "
                       "WHERE inference_id = 'v1-999'").result_rows
    assert row == [(999 / 10, 999 * 10 / 10, "south", "f", 999 / 3000, 1.0, None, 999)]
    # once the last model is registered, a second run finishes and renames v1
    pq.write_table(pa.table({"x": [1.0], "prediction": [1.0]}), settings.data_dir / "gone.parquet")
    registry.register("gone_model", {"task": "regression", "features": [{"name": "x", "type": "numeric"}]},
                      settings.data_dir / "gone.parquet")
    again = migrate(EnrichedTables.from_settings(client, settings), registry)
    assert again.rows == {sample.MODEL_ID: 3000, "gone_model": 10} and again.legacy == "renamed"
    assert client.query(f"SELECT count() FROM {view}").result_rows == [(3000,)]  # copied twice, one row each
    tables = {r[0] for r in client.query("SELECT name FROM system.tables WHERE database = 'enricher_store'"
                                         ).result_rows}
    assert "inferences_v1" in tables and "inferences" not in tables
    assert not migrate(EnrichedTables.from_settings(client, settings), registry).found


def test_enricher_migrate_says_what_it_did(v1_store, capsys):
    settings, registry, client = v1_store
    client.command("DELETE FROM enricher_store.inferences WHERE model_id = 'gone_model'")
    client.close()
    argv = ["--data-dir", str(settings.data_dir), "migrate", "--drop-legacy"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{sample.MODEL_ID}: 3000 rows copied" in out and "layout v1 table: dropped" in out
    assert main(argv) == 0
    assert "nothing to migrate" in capsys.readouterr().out
    assert main(["--data-dir", str(settings.data_dir), "query", "--format", "json",
                 f"SELECT count() AS n FROM enricher.{sample.MODEL_ID}"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 3000}]


def test_drop_rows_deletes_one_models_rows_and_asks_first(v1_store, capsys):
    settings, registry, client = v1_store
    migrate(EnrichedTables.from_settings(client, settings), registry)
    client.close()
    base = ["--data-dir", str(settings.data_dir)]
    assert main(base + ["models", "drop-rows", sample.MODEL_ID]) == 2
    assert "add --yes" in capsys.readouterr().err
    assert main(base + ["models", "drop-rows", "Bad-Id", "--yes"]) == 2
    assert "invalid model id" in capsys.readouterr().err
    assert main(base + ["models", "drop-rows", sample.MODEL_ID, "--yes"]) == 0
    assert "deleted the enriched rows" in capsys.readouterr().out
    again = connect(settings)
    try:
        assert again.query(f"SELECT count() FROM enricher_store.enriched WHERE model_id = '{sample.MODEL_ID}'"
                           ).result_rows == [(0,)]
        assert again.query("SELECT count() FROM enricher_store.inferences").result_rows == [(3510,)]  # v1 untouched
    finally:
        again.close()
    assert registry.get(sample.MODEL_ID).model_id == sample.MODEL_ID  # still registered
