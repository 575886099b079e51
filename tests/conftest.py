"""Fixtures: a real Tansu broker and the real chDB engine, nothing mocked.

One broker per test module (Tansu's memory storage grows without bound);
every test gets its own data directory, topics, consumer group and HTTP port,
so tests never see each other's messages or tables.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from enricher.models.registry import ModelRegistry
from enricher.pipelines.train import train

from enricher import sample
from enricher.broker import EmbeddedBroker, free_port
from enricher.config import Settings
from enricher.control.registry import open_registry

_counter = itertools.count()


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker(port=free_port()) as b:
        yield b


@pytest.fixture
def make_settings(tmp_path, broker):
    def make(**overrides) -> Settings:
        tag = f"{next(_counter)}-{uuid.uuid4().hex[:6]}"
        values = dict(data_dir=str(tmp_path / "data"), broker=broker.url, http_port=free_port(),
                      trigger_metrics_port=free_port(),
                      inference_topic=f"inferences-{tag}", dlq_topic=f"dlq-{tag}",
                      consumer_group=f"enricher-{tag}", session_timeout=6.0, topic_partitions=2,
                      batch_size=2000, batch_timeout=0.2, max_message_bytes=16_384, refresh_interval=0.5,
                      reference_roots=str(tmp_path))  # references are written under tmp_path; the API reads there
        values.update(overrides)
        return Settings.from_env(env={}, **values)
    return make


@pytest.fixture
def settings(make_settings):
    return make_settings()


def register_sample(settings: Settings, tmp_path, enable: bool = True, trained: bool = True,
                    model_id: str = sample.MODEL_ID, rows: int = 5000) -> ModelRegistry:
    reference = tmp_path / f"reference-{model_id}.parquet"
    pq.write_table(sample.reference_table(rows), reference)
    registry = open_registry(settings)
    registry.register(model_id, sample.SCHEMA, reference)
    if enable:
        registry.set_enrichment(model_id, "anomaly_detection", True)
    if trained:
        train(registry, settings.artifacts(), model_id, log=lambda m: None)
    return registry


def offline_registry(tmp_path, reference_rows: int):
    """Settings with no broker to reach, an empty registry, and a sample
    reference file: for training and trigger tests that need no stream."""
    settings = Settings.from_env(env={}, data_dir=str(tmp_path / "data"), broker="kafka://127.0.0.1:1")
    reference = tmp_path / "reference.parquet"
    pq.write_table(sample.reference_table(reference_rows), reference)
    return settings, ModelRegistry(settings.registry_dir), reference


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 endpoint over HTTP (moto's server), with one bucket."""
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    from enricher.broker import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="artifacts")
    yield f"s3://artifacts/enricher?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def server(tmp_path):
    """ClickHouse's HTTP interface over the real engine (tests/clickhouse_http.py)."""
    from .clickhouse_http import ClickHouseHTTP

    front = ClickHouseHTTP(tmp_path / "server").start()
    yield front
    front.stop()


@pytest.fixture
def prometheus(tmp_path):
    """A real Prometheus (Debian's) scraping the given host:port targets every second; yields its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: `make test` installs Debian's package (apt-get install prometheus)")
    procs = []

    def start(*targets: str) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n"
                          f"scrape_configs:\n  - job_name: enricher\n    static_configs:\n"
                          f"      - targets: {list(targets)}\n")
        subprocess.run([shutil.which("promtool"), "check", "config", str(config)], check=True, capture_output=True)
        procs.append(subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


def promql(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())["data"]["result"]
    except OSError:
        return []


def promql_range(base: str, expr: str, start: float, end: float, step: float = 1.0) -> list:
    """A range query, as a dashboard panel sends it; [] when Prometheus is not answering yet."""
    url = f"{base}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": step})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())["data"]["result"]
    except OSError:
        return []


ARGO = Path(__file__).resolve().parent.parent.parent / "shared" / "argo"
SCHEMA_FILE = ARGO / "workflow-schema-v4.0.5.json"
WORKFLOW = "io.argoproj.workflow.v1alpha1.Workflow"


@pytest.fixture(scope="module")
def validator():
    import copy

    import jsonschema

    if not SCHEMA_FILE.exists():
        pytest.skip(f"Argo's schema is not beside the checkout ({SCHEMA_FILE}); CI has it")
    doc = json.loads(SCHEMA_FILE.read_text())
    definitions = copy.deepcopy(doc["definitions"])
    # Quirk 1 (../shared/argo/README.md): IntOrString is typed "string" only.
    definitions["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = {"type": ["string", "integer"]}
    # Quirk 2: nothing forbids unknown fields; forbid them so a misspelt field fails.
    for d in definitions.values():
        if d.get("type") == "object" and "properties" in d and "additionalProperties" not in d:
            d["additionalProperties"] = False
    schema = {"$schema": doc["$schema"], "$ref": f"#/definitions/{WORKFLOW}", "definitions": definitions}
    return jsonschema.Draft202012Validator(schema)
