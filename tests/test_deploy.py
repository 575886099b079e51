"""The Dockerfile, the Kubernetes manifests and the README speak the same settings."""

import re
from pathlib import Path

import kubernetes_validate
import yaml

from enricher.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SOURCE = (ROOT / "enricher" / "config.py").read_text()
KNOWN = set(re.findall(r'"(ENRICHER_[A-Z_]+)"', SOURCE))


def names_in(text: str) -> set[str]:
    return {n.removesuffix("_FILE") for n in re.findall(r"\b(ENRICHER_[A-Z_]+)\b", text)}


def test_every_setting_named_in_docker_k8s_and_readme_exists():
    for path in (ROOT / "docker" / "Dockerfile", *sorted((ROOT / "k8s").glob("*.yaml")), ROOT / "README.md"):
        unknown = names_in(path.read_text()) - KNOWN
        assert not unknown, f"{path.name} names settings the code does not read: {sorted(unknown)}"


def test_the_readme_documents_every_setting():
    missing = KNOWN - names_in((ROOT / "README.md").read_text())
    assert not missing, f"README does not document {sorted(missing)}"


def test_the_k8s_config_map_is_accepted_by_the_settings_reader(tmp_path):
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "worker.yaml").read_text()))
    env = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    for name in [k for k in env if k.endswith("_FILE")]:
        secret = tmp_path / name
        secret.write_text("x")
        env[name] = str(secret)
    s = Settings.from_env(env=env)
    assert s.security_protocol == "SASL_SSL" and s.clickhouse_database == "enricher"
    assert s.runner == "argo" and s.argo_token == "x" and s.argo_url.startswith("https://")


def test_k8s_manifests_validate_against_the_kubernetes_schemas():
    files = sorted((ROOT / "k8s").glob("*.yaml"))
    assert {f.name for f in files} >= {"worker.yaml", "trigger.yaml"}
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, "1.30", strict=True)


def test_the_readme_opening_calls_available_what_a_user_can_switch_on():
    """Its first paragraph: "(<available> today; <planned ones> are planned)". An enrichment
    that exists is named among the available, not the planned."""
    from enricher.models import ENRICHMENTS

    opening = " ".join((ROOT / "README.md").read_text().split("\n\n")[1].split())
    listing = opening[opening.index("(") + 1:opening.index(")")]
    available, _, planned = listing.partition(" today;")
    words = {"anomaly_detection": "anomaly detection", "explainability": "explanations"}
    for name in ENRICHMENTS:
        said = words.get(name, name.replace("_", " "))
        assert said in available and said not in planned, (name, listing)
