"""The registry kept in ClickHouse and the artifact store (ENRICHER_CONTROL_STORE=clickhouse):
what the directory keeps, seen alike from two machines (two data directories), with
concurrent writers in several processes losing nothing. Against the real engine, over
its HTTP interface (tests/clickhouse_http.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from enricher.models.registry import ModelRegistry

from enricher import sample
from enricher.config import Settings
from enricher.control.registry import open_registry

pytestmark = pytest.mark.timeout(300)


def machine(tmp_path, server, name: str) -> Settings:
    """One machine's settings: its own data directory; the shared ClickHouse and object store."""
    return Settings.from_env(env={}, data_dir=str(tmp_path / name), broker="kafka://127.0.0.1:1",
                             clickhouse_url=server.url(), control_store="clickhouse",
                             artifact_store_url=str(tmp_path / "object-store"))


def test_a_model_registered_on_one_machine_is_the_same_on_another_as_in_a_directory(tmp_path, server):
    reference = tmp_path / "reference.parquet"
    pq.write_table(sample.reference_table(800), reference)
    a, b = open_registry(machine(tmp_path, server, "a")), open_registry(machine(tmp_path, server, "b"))
    directory = ModelRegistry(tmp_path / "directory")
    assert a.ids() == [] and a.generation() == 0
    for registry in (a, directory):
        registry.register(sample.MODEL_ID, sample.SCHEMA, reference)
        registry.set_enrichment(sample.MODEL_ID, "anomaly_detection", True, {"n_estimators": 50})
        registry.set_status(sample.MODEL_ID, "anomaly_detection", "ready", version=3, workflow="w-1")
    assert b.ids() == directory.ids() == [sample.MODEL_ID]
    assert b.get(sample.MODEL_ID) == directory.get(sample.MODEL_ID)  # spec and slots alike
    assert b.enrichments(sample.MODEL_ID) == directory.enrichments(sample.MODEL_ID)
    assert b.status(sample.MODEL_ID, "anomaly_detection")["version"] == 3
    assert b.reference(sample.MODEL_ID).equals(directory.reference(sample.MODEL_ID))
    assert b.reference_schema(sample.MODEL_ID) == directory.reference_schema(sample.MODEL_ID)
    assert len(b.reference_digest(sample.MODEL_ID)) == 64 and b.model_file(sample.MODEL_ID) is None
    # a change on one machine moves the generation the other polls
    before = b.generation()
    a.set_enrichment(sample.MODEL_ID, "explainability", True)
    assert b.generation() > before and "explainability" in b.enabled(sample.MODEL_ID)
    # nothing was written to either machine's data directory
    assert not (tmp_path / "a" / "registry").exists() and not (tmp_path / "b" / "registry").exists()


def test_reference_bytes_changed_in_the_object_store_are_refused(tmp_path, server):
    reference = tmp_path / "reference.parquet"
    pq.write_table(sample.reference_table(300), reference)
    registry = open_registry(machine(tmp_path, server, "a"))
    registry.register(sample.MODEL_ID, sample.SCHEMA, reference)
    [stored] = (tmp_path / "object-store" / "_registry" / sample.MODEL_ID).glob("*reference.parquet")
    pq.write_table(sample.reference_table(300, seed=99), stored)  # same name, other rows
    with pytest.raises(OSError, match="does not match its registration"):
        registry.reference(sample.MODEL_ID)


WRITER = """
import json, sys
from enricher.config import Settings
from enricher.control.plane import ControlPlane
from enricher.control.registry import open_registry

settings = Settings.from_env(env={{}}, data_dir=sys.argv[1], broker="kafka://127.0.0.1:1",
                             clickhouse_url={url!r}, control_store="clickhouse",
                             artifact_store_url={objects!r})
plane = ControlPlane(open_registry(settings), settings.artifacts())
name, field = sys.argv[2], sys.argv[3]
for k in range(1, 26):
    plane.patch_enrichments({model!r}, {{name: {{"config": {{field: k}}}}}})
print("done")
"""


def test_two_processes_patching_at_once_lose_nothing(tmp_path, server):
    """Two control planes on two machines PATCH different enrichments of one model 25
    times each, at once: each enrichment ends at its writer's last value."""
    reference = tmp_path / "reference.parquet"
    pq.write_table(sample.reference_table(300), reference)
    settings = machine(tmp_path, server, "a")
    open_registry(settings).register(sample.MODEL_ID, sample.SCHEMA, reference)
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(url=server.url(), objects=str(tmp_path / "object-store"), model=sample.MODEL_ID))
    root = Path(__file__).resolve().parent.parent
    writers = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"m{i}"), name, field], cwd=root,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i, (name, field) in enumerate([("anomaly_detection", "n_estimators"),
                                                  ("explainability", "n_estimators")])]
    for w in writers:
        out, err = w.communicate(timeout=240)
        assert w.returncode == 0 and out.strip() == "done", err
    toggles = open_registry(machine(tmp_path, server, "c")).enrichments(sample.MODEL_ID)
    assert toggles["anomaly_detection"]["config"] == {"n_estimators": 25}
    assert toggles["explainability"]["config"] == {"n_estimators": 25}


def test_the_control_store_setting_is_checked():
    from enricher.config import ConfigError

    with pytest.raises(ConfigError, match="ENRICHER_CONTROL_STORE='shared'"):
        Settings.from_env(env={"ENRICHER_CONTROL_STORE": "shared"}, data_dir="/tmp/x").validate()
    assert json.dumps(Settings.from_env(env={}, data_dir="/tmp/x").control_store) == '"directory"'


def test_a_directory_registry_is_copied_into_clickhouse_whole(tmp_path, server):
    from enricher.cli import main

    reference = tmp_path / "reference.parquet"
    pq.write_table(sample.reference_table(400), reference)
    settings = machine(tmp_path, server, "a")
    directory = ModelRegistry(settings.registry_dir)
    directory.register(sample.MODEL_ID, sample.SCHEMA, reference)
    directory.set_enrichment(sample.MODEL_ID, "anomaly_detection", True, {"n_estimators": 60})
    directory.set_status(sample.MODEL_ID, "anomaly_detection", "ready", version=2)
    env = {"ENRICHER_CONTROL_STORE": "clickhouse", "ENRICHER_CLICKHOUSE_URL": server.url(),
           "ENRICHER_ARTIFACT_STORE": str(tmp_path / "object-store")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert main(["--data-dir", str(settings.data_dir), "models", "copy-registry"]) == 0
    copied = open_registry(machine(tmp_path, server, "b"))
    assert copied.ids() == [sample.MODEL_ID] and copied.get(sample.MODEL_ID) == directory.get(sample.MODEL_ID)
    assert copied.enrichments(sample.MODEL_ID) == directory.enrichments(sample.MODEL_ID)
    assert copied.status(sample.MODEL_ID, "anomaly_detection") == directory.status(sample.MODEL_ID,
                                                                                     "anomaly_detection")
    assert copied.reference(sample.MODEL_ID).equals(directory.reference(sample.MODEL_ID))
    # with the directory still the control store, the command says what to set
    assert main(["--data-dir", str(settings.data_dir), "models", "copy-registry"]) == 2
