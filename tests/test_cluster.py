"""A ClickHouse cluster (ENRICHER_CLICKHOUSE_CLUSTER): the DDL for it parses with ClickHouse's own
parser and has the shape a replicated, sharded deployment needs. No Keeper (hence no Replicated
table) can run here: README *A ClickHouse cluster* says what is not tested."""

import re

import pytest

from enricher import sample
from enricher.cli import main
from enricher.config import ConfigError, Settings
from enricher.store.clickhouse import SHARDING, EnrichedTables, Topology, connect, schema_ddl
from tests.clickhouse_parse import parse
from tests.conftest import register_sample


def schema(capsys, *argv) -> list[str]:
    assert main(["schema", *argv]) == 0
    out = "\n".join(line for line in capsys.readouterr().out.splitlines() if not line.startswith("--"))
    return [s.strip() for s in (out + "\n").split(";\n") if s.strip()]


@pytest.fixture
def registered(tmp_path, monkeypatch):
    monkeypatch.setenv("ENRICHER_DATA_DIR", str(tmp_path / "data"))
    settings = Settings.from_env()
    register_sample(settings, tmp_path, trained=False, rows=500)
    return settings


def test_the_cluster_ddl_parses_with_clickhouses_parser_and_is_replicated_sharded_and_distributed(
        registered, capsys):
    statements = schema(capsys, "--cluster", "analytics")
    results = parse(statements)
    assert all(ok for ok, _ in results), [text for ok, text in results if not ok]
    assert all(" ON CLUSTER `analytics`" in s for s in statements)
    creates = {m.group(1): s for s in statements
               if (m := re.match(r"CREATE TABLE IF NOT EXISTS `enricher_store`\.`(\w+)`", s))}
    locals_ = {n for n in creates if n.endswith("_local")}
    assert {n.removesuffix("_local") for n in locals_} == set(SHARDING) == {n for n in creates if n not in locals_}
    for name in SHARDING:
        assert re.search(r"ENGINE = Replicated\w*MergeTree\('/clickhouse/tables/\{shard\}/\{database\}/\{table\}', "
                         r"'\{replica\}'", creates[f"{name}_local"]), name
        assert creates[name].endswith(f"ENGINE = Distributed('analytics', 'enricher_store', '{name}_local', "
                                      f"{SHARDING[name]})"), name
    # a row's copies and its label land on one shard: FINAL on each shard folds them
    assert SHARDING["enriched"] == SHARDING["labels"] == "cityHash64(model_id, inference_id)"
    assert "replicated_deduplication_window" in creates["enriched_local"]
    # the model's columns reach the stored and the Distributed table alike; its view reads the Distributed one
    adds = [s for s in statements if s.startswith("ALTER TABLE")]
    assert adds and len(adds) % 2 == 0
    for stored, distributed in zip(adds[::2], adds[1::2]):
        assert "`enriched_local`" in stored and "`enriched`" in distributed
        assert stored.split(" ADD COLUMN ")[1] == distributed.split(" ADD COLUMN ")[1]
    [view] = [s for s in statements if s.startswith("CREATE OR REPLACE VIEW")]
    assert f"`enricher`.`{sample.MODEL_ID}` ON CLUSTER `analytics`" in view
    assert "FROM `enricher_store`.`enriched` FINAL PREWHERE model_id = 'credit_default'" in view


def test_a_broken_statement_is_caught_by_the_parser():
    [(ok, message)] = parse(["CREATE TABLE t ON CLUSTER analytics (a Int32) ENGINE = Distributed('analytics', "])
    assert not ok and "Syntax error" in message


def test_the_one_server_ddl_is_what_the_worker_runs_and_the_worker_takes_tables_a_dba_made(registered, capsys,
                                                                                          tmp_path):
    """Without a cluster nothing of it shows, and the statements a DBA applies by hand give the worker
    tables it writes to (the single-node path is unchanged: the rest of the suite runs on it)."""
    statements = schema(capsys)
    assert not any("ON CLUSTER" in s or "Replicated" in s or "Distributed" in s for s in statements)
    from enricher.control.registry import open_registry

    spec = open_registry(registered).get(sample.MODEL_ID)
    assert statements == schema_ddl(Topology("enricher"), 0, [spec])
    fresh = Settings.from_env(env={}, data_dir=str(tmp_path / "dba"))
    client = connect(fresh)
    try:
        for statement in statements:  # as the DBA would, before any worker
            client.command(statement)
        tables = EnrichedTables.from_settings(client, fresh)
        tables.ensure_view(spec)  # the worker's own first use: nothing to add, nothing refused
        names = {r[0] for r in client.query("SELECT name FROM system.tables WHERE database = 'enricher_store'"
                                            ).result_rows}
        assert names >= set(SHARDING)
        assert client.query(f"SELECT count() FROM enricher.{sample.MODEL_ID}").result_rows == [(0,)]
    finally:
        client.close()


def test_the_cluster_setting_is_checked():
    server = "http://user@clickhouse-1:8123/enricher"
    assert Settings.from_env(env={"ENRICHER_CLICKHOUSE_CLUSTER": "analytics", "ENRICHER_CLICKHOUSE_URL": server}
                             ).clickhouse_cluster == "analytics"
    with pytest.raises(ConfigError, match="letters, digits and _"):
        Settings.from_env(env={"ENRICHER_CLICKHOUSE_CLUSTER": "a;DROP", "ENRICHER_CLICKHOUSE_URL": server})
    with pytest.raises(ConfigError, match="the embedded engine is one node"):
        Settings.from_env(env={"ENRICHER_CLICKHOUSE_CLUSTER": "analytics"})


def test_a_bad_cluster_name_on_the_command_line_says_what_to_fix(registered, capsys):
    assert main(["schema", "--cluster", "two words"]) == 2
    assert "--cluster 'two words': the cluster's name" in capsys.readouterr().err


def test_the_query_users_ddl_on_a_cluster_reaches_every_node_and_the_stored_tables(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("ENRICHER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ENRICHER_CLICKHOUSE_URL", "http://admin@clickhouse-1:8123/enricher")
    monkeypatch.setenv("ENRICHER_QUERY_PASSWORD", "reader-secret")
    plain = schema(capsys, "--query-user")
    monkeypatch.setenv("ENRICHER_CLICKHOUSE_CLUSTER", "analytics")
    statements = schema(capsys, "--query-user")
    assert all(ok for ok, _ in parse(statements)), parse(statements)
    assert all("ON CLUSTER `analytics`" in s for s in statements)
    assert not any("ON CLUSTER" in s for s in plain)
    assert "GRANT ON CLUSTER `analytics` SELECT ON `enricher_store`.`enriched_local`" in "\n".join(statements)
    assert "reader-secret" not in "\n".join(statements)
