"""docker/compose.yaml: valid against the Compose specification's JSON schema, every command it
runs a command of this CLI, every file it mounts present, and its parts agreeing with each other
(no Docker engine runs on our machines: this is what can be checked without one)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from enricher.cli import build_parser
from enricher.config import Settings
from enricher.observe import alerts, dashboard
from tests.clickhouse_parse import parse

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
SPEC = Path(sys.prefix) / "share" / "compose-spec" / "compose_spec.json"
ENRICHER_SERVICES = ("worker", "trigger", "producer")


def interpolate(text: str) -> str:
    """Compose's ${VAR:-default} with no variable set, and $$ as a literal $."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), text)
    return text.replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text()))  # YAML merge keys (<<) resolved


def test_compose_validates_against_the_compose_specification(compose):
    if not SPEC.exists():
        pytest.fail(f"{SPEC} is missing: `make setup-test` fetches it from the docker-compose 1.29.2 wheel")
    schema = json.loads(SPEC.read_text())
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft201909Validator(schema).iter_errors(compose)]
    assert not errors
    broken = {**compose, "services": {**compose["services"], "worker": {**compose["services"]["worker"],
                                                                         "restart_policy": "always"}}}
    assert list(jsonschema.Draft201909Validator(schema).iter_errors(broken)), "a misspelt key is refused"


def test_the_stack_has_every_part_and_pins_every_image(compose):
    services = compose["services"]
    assert set(services) >= {"kafka", "clickhouse", "minio", "prometheus", "grafana", *ENRICHER_SERVICES}
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith((":latest", ":local")) or name in ENRICHER_SERVICES, image
    for name in ENRICHER_SERVICES:
        assert services[name]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        assert (DOCKER / services[name]["build"]["context"] / services[name]["build"]["dockerfile"]).exists()


def test_every_command_the_enricher_services_run_is_a_command_of_the_cli(compose):
    parser = build_parser()
    ran = []
    for name in ENRICHER_SERVICES:
        service = compose["services"][name]
        if service.get("entrypoint") == ["/bin/sh", "-c"]:
            script = " ".join(service["command"])
            commands = [shlex.split(part.strip()) for part in re.split(r"&&|;", script)]
        else:
            commands = [["enricher", *service["command"]]]  # the image's entry point is `enricher`
        for words in commands:
            words = words[1:] if words[0] == "exec" else words
            assert words[0] == "enricher", words
            parser.parse_args(words[1:])  # argparse exits on an unknown command or option
            ran.append(words[1])
    assert ran == ["worker", "trigger", "sample", "sample"]


def test_the_enricher_services_share_no_volume_and_their_settings_read(compose, tmp_path):
    for name in ENRICHER_SERVICES:
        service = compose["services"][name]
        assert "volumes" not in service, f"{name} mounts a volume: the stack shares none"
        env = {k: str(v) for k, v in service["environment"].items()}
        settings = Settings.from_env(env=env)
        assert settings.control_store == "clickhouse" and settings.artifact_store_url.startswith("s3://")
        assert settings.clickhouse_url.startswith("http://") and settings.runner == "local"
        assert settings.api_token, "the worker binds 0.0.0.0: a token is required"
    assert compose["services"]["producer"]["depends_on"]["worker"]["condition"] == "service_healthy"


def test_every_file_mounted_exists_and_the_dashboard_and_rules_are_the_committed_ones(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), (name, source)
    grafana = compose["services"]["grafana"]["volumes"]
    dashboards = next(v for v in grafana if v.startswith("../k8s/base/grafana:"))
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/enricher.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == dashboards.split(":")[1]
    assert (DOCKER / dashboards.split(":")[0] / dashboard.OUTPUT.name).read_text() == dashboard.render()
    rules = next(v for v in compose["services"]["prometheus"]["volumes"] if "alerts.yaml" in v)
    assert (DOCKER / rules.split(":")[0]).resolve() == alerts.RULES


def test_grafana_gets_both_data_sources_the_dashboard_asks_for(compose):
    sources = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/enricher.yaml").read_text())["datasources"]
    types = {s["type"] for s in sources}
    doc = dashboard.build()
    wanted = {v["query"] for v in doc["templating"]["list"] if v["type"] == "datasource"}
    assert wanted == types == {"prometheus", dashboard.CLICKHOUSE_PLUGIN}
    assert dashboard.CLICKHOUSE_PLUGIN in compose["services"]["grafana"]["environment"]["GF_INSTALL_PLUGINS"]
    clickhouse = next(s for s in sources if s["type"] == dashboard.CLICKHOUSE_PLUGIN)
    assert clickhouse["jsonData"]["username"] == "grafana"  # the read-only user the init script makes
    assert "prometheus:9090" in next(s for s in sources if s["type"] == "prometheus")["url"]


def test_prometheus_config_checks_and_scrapes_the_worker_and_trigger_ports(compose, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: `make test` installs Debian's prometheus package")
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    # promtool reads the rule files too: point it at the file the container mounts there
    config["rule_files"] = [str(alerts.RULES)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    check = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    services = compose["services"]
    assert targets == [f"worker:{services['worker']['environment']['ENRICHER_HTTP_PORT']}",
                       f"trigger:{services['trigger']['environment']['ENRICHER_TRIGGER_METRICS_PORT']}"]


def test_the_grafana_user_sql_parses_with_clickhouses_own_parser():
    script = (DOCKER / "clickhouse" / "grafana-user.sh").read_text()
    sql = script.split("<<SQL\n", 1)[1].split("\nSQL", 1)[0].replace("${GRAFANA_CLICKHOUSE_PASSWORD}", "x")
    statements = [s.strip() for s in sql.split(";") if s.strip()]
    assert len(statements) == 3 and os.access(DOCKER / "clickhouse" / "grafana-user.sh", os.X_OK)
    results = parse(statements + ["GRANT SELEKT ON enricher.* TO grafana"])
    assert [ok for ok, _ in results] == [True, True, True, False], results
    assert "readonly = 1" in results[0][1]
