"""k8s/: the Kustomize base and the example overlay, rendered by kubectl's Kustomize, valid for
Kubernetes 1.32 (kubernetes-validate's schemas), and consistent with what the code reads and serves."""

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from enricher.config import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.32"  # kubernetes-validate's schemas for this release (our machines' kubectl)
BASE = ROOT / "k8s" / "base"
OVERLAY = ROOT / "k8s" / "overlays" / "example"
OPERATOR_KINDS = {"PodMonitor", "PrometheusRule"}  # Prometheus Operator CRDs: no schema offline, checked below


def rendered(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR`, as a user renders it (Kustomize 5.5 built into kubectl 1.32)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed here: only the Kustomize rendering is skipped "
                    "(`make services` installs it where Debian packages it)")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
    return found[0]


def pod_labels(docs, deployment: str) -> dict:
    return find(docs, "Deployment", deployment)["spec"]["template"]["metadata"]["labels"]


def overlay_settings(docs, tmp_path) -> tuple[Settings, dict]:
    env = dict(find(docs, "ConfigMap", "enricher-config")["data"])
    secret = find(docs, "Secret", "enricher-secrets")
    for name in [k for k in env if k.startswith("ENRICHER_") and k.endswith("_FILE")]:
        key = Path(env[name]).name
        if env[name].startswith("/etc/enricher/secrets/"):  # a key of the Secret the pods mount there
            assert key in secret["data"], (name, key)
        (tmp_path / key).write_text("x")
        env[name] = str(tmp_path / key)
    return Settings.from_env(env=env), env


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_k8s_renders_and_validates_against_the_kubernetes_schemas(directory):
    docs = rendered(directory)
    kinds = {d["kind"] for d in docs}
    assert kinds >= {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Role", "RoleBinding",
                     "PodDisruptionBudget", "NetworkPolicy", "PodMonitor", "PrometheusRule"}
    for doc in docs:
        if doc["kind"] in OPERATOR_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # no shared volume anywhere: no claim, no Deployment mounting one
    assert "PersistentVolumeClaim" not in kinds
    for d in (d for d in docs if d["kind"] == "Deployment"):
        assert all("persistentVolumeClaim" not in v for v in d["spec"]["template"]["spec"].get("volumes", []))


def test_an_invalid_manifest_is_refused_by_the_validator():
    """The validation can fail: a Deployment with a misspelt field is refused in strict mode."""
    worker = find(rendered(BASE), "Deployment", "enricher-worker")
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSION, strict=True)


def test_the_overlay_config_is_read_by_the_settings_reader_and_matches_the_deployments(tmp_path):
    docs = rendered(OVERLAY)
    s, env = overlay_settings(docs, tmp_path)
    assert s.control_store == "clickhouse" and s.artifact_store_url.startswith("s3://")
    assert s.runner == "argo" and s.security_protocol == "SASL_SSL"
    worker, trigger = find(docs, "Deployment", "enricher-worker"), find(docs, "Deployment", "enricher-trigger")
    namespace = worker["metadata"]["namespace"]
    assert s.argo_namespace == namespace == "ml-enricher", "training runs go to the trigger's namespace"
    image = worker["spec"]["template"]["spec"]["containers"][0]["image"]
    assert s.image == image == trigger["spec"]["template"]["spec"]["containers"][0]["image"]
    secret = find(docs, "Secret", "enricher-secrets")
    assert "aws-credentials" in secret["data"] and env["AWS_SHARED_CREDENTIALS_FILE"].endswith("/aws-credentials")
    assert 1 <= worker["spec"]["replicas"] <= s.topic_partitions, "replicas up to the topic's partitions"
    assert trigger["spec"]["replicas"] == 1 and trigger["spec"]["strategy"]["type"] == "Recreate"


def test_the_worker_shuts_down_within_its_grace_and_is_probed_on_a_route_it_serves():
    docs = rendered(OVERLAY)
    config = find(docs, "ConfigMap", "enricher-config")["data"]
    pod = find(docs, "Deployment", "enricher-worker")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= float(config["ENRICHER_SHUTDOWN_GRACE"]) + 10
    [c] = pod["containers"]
    assert c["args"] == ["worker"] and c["securityContext"]["readOnlyRootFilesystem"]
    api = (ROOT / "enricher" / "http" / "api.py").read_text()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = c[probe]["httpGet"]["path"]
        assert f'@app.page("{path}")' in api, (probe, path)
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["ports"] == [{"name": "http", "containerPort": int(config["ENRICHER_HTTP_PORT"])}]
    trigger = find(docs, "Deployment", "enricher-trigger")["spec"]["template"]["spec"]["containers"][0]
    assert trigger["ports"][0]["containerPort"] == int(config["ENRICHER_TRIGGER_METRICS_PORT"])
    pdb = find(docs, "PodDisruptionBudget", "enricher-worker")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(docs, "enricher-worker").items()


def test_the_trigger_may_only_create_follow_and_stop_workflows_in_its_namespace():
    docs = rendered(OVERLAY)
    role = find(docs, "Role", "enricher-trigger")
    assert role["rules"] == [{"apiGroups": ["argoproj.io"], "resources": ["workflows"],
                              "verbs": ["create", "get", "list", "watch", "update", "patch"]}]
    assert not any(d["kind"].startswith("Cluster") for d in docs), "no cluster-wide rights"
    binding = find(docs, "RoleBinding", "enricher-trigger")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "enricher-trigger",
                                    "namespace": role["metadata"]["namespace"]}]
    token = find(docs, "Secret", "enricher-trigger-token")
    assert token["type"] == "kubernetes.io/service-account-token"
    assert token["metadata"]["annotations"]["kubernetes.io/service-account.name"] == "enricher-trigger"
    config = find(docs, "ConfigMap", "enricher-config")["data"]
    pod = find(docs, "Deployment", "enricher-trigger")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    token_dir = str(Path(config["ENRICHER_ARGO_TOKEN_FILE"]).parent)
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[token_dir])
    assert volume["secret"]["secretName"] == "enricher-trigger-token"
    assert pod["serviceAccountName"] == "enricher-trigger"
    training = find(docs, "Role", "enricher-training")
    assert training["rules"] == [{"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"],
                                  "verbs": ["create", "patch"]}]


def test_the_workflow_the_trigger_submits_here_validates_and_names_what_the_manifests_make(tmp_path, validator):
    """The Argo side: the workflow built from the overlay's settings is valid against Argo's
    schema and runs as a service account, with a Secret and a ConfigMap, the manifests create."""
    from enricher.models import ENRICHMENTS
    from enricher.pipelines.workflow import workflow_dict

    from enricher.control.trigger import workflow_options
    docs = rendered(OVERLAY)
    settings, _ = overlay_settings(docs, tmp_path)
    doc = workflow_dict({"credit_default": {n: {} for n in ENRICHMENTS}}, workflow_options(settings))
    assert not list(validator.iter_errors(doc))  # Argo's schema, with its IntOrString quirk handled
    assert doc["metadata"]["namespace"] == "ml-enricher"
    find(docs, "ServiceAccount", doc["spec"]["serviceAccountName"])
    for template in (t for t in doc["spec"]["templates"] if "container" in t):
        assert template["container"]["image"] == settings.image
        assert [v["secret"]["secretName"] for v in template["volumes"]] == ["enricher-secrets"]
        assert [e["configMapRef"]["name"] for e in template["container"]["envFrom"]] == ["enricher-config"]
    find(docs, "Secret", "enricher-secrets")


def test_prometheus_and_grafana_find_what_they_need_in_the_manifests():
    from enricher.observe import alerts, dashboard

    docs = rendered(OVERLAY)
    board = find(docs, "ConfigMap", "enricher-grafana-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert board["data"]["enricher-dashboard.json"] == dashboard.OUTPUT.read_text()
    rule = find(docs, "PrometheusRule", "enricher-alerts")
    assert rule["spec"]["groups"] == yaml.safe_load(alerts.RULES.read_text())["groups"]
    assert find(docs, "ConfigMap", "enricher-alert-rules")["data"]["alerts.yaml"] == alerts.RULES.read_text()
    monitor = find(docs, "PodMonitor", "enricher")
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    ports = {p["name"] for d in deployments for c in d["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == ports
    for d in deployments:
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels(docs, d["metadata"]["name"]).items()
    # each Deployment's served port is open in its NetworkPolicy, and only that
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        selector = policy["spec"]["podSelector"]["matchLabels"].items()
        [selected] = [d for d in deployments if selector <= pod_labels(docs, d["metadata"]["name"]).items()]
        served = {p["containerPort"] for c in selected["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == served
