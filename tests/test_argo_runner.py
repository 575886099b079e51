"""The argo runner against a local HTTP server standing in for the Argo Server.

Every request is checked against Argo's own API description
(../shared/argo/argo-server-swagger.json): the path is one the server
offers for that method, the bearer token is sent, and the body validates
against the request schema the server declares for it.
"""

import copy
import json
import re
from pathlib import Path

import pytest
from enricher.pipelines.runners import ArgoRunner, RunnerError
from enricher.pipelines.workflow import WorkflowOptions, workflow_dict
from werkzeug import Response

SWAGGER_FILE = Path(__file__).resolve().parent.parent.parent / "shared" / "argo" / "argo-server-swagger.json"
TOKEN = "argo-t0ken"


@pytest.fixture(scope="module")
def swagger():
    if not SWAGGER_FILE.exists():
        pytest.skip(f"Argo's API description is not beside the checkout ({SWAGGER_FILE}); CI has it")
    return json.loads(SWAGGER_FILE.read_text())


def operation(swagger, method: str, path: str) -> dict:
    """The swagger operation a concrete request path matches."""
    for template, item in swagger["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in item:
            return item[method.lower()]
    raise AssertionError(f"{method} {path} is not in the Argo Server API")


def check_request(swagger, request) -> None:
    import jsonschema

    op = operation(swagger, request.method, request.path)
    assert request.headers.get("Authorization") == f"Bearer {TOKEN}"
    body = [p for p in op.get("parameters", []) if p.get("in") == "body"]
    if body:
        definitions = copy.deepcopy(swagger["definitions"])
        # The same IntOrString quirk as the workflow schema: widen it.
        definitions["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = {"type": ["string", "integer"]}
        schema = {"$ref": body[0]["schema"]["$ref"], "definitions": definitions}
        jsonschema.Draft4Validator(schema).validate(json.loads(request.data))


@pytest.fixture
def argo(httpserver, swagger):
    seen = []

    def record(request):
        check_request(swagger, request)
        seen.append((request.method, request.path, json.loads(request.data) if request.data else None))

    return httpserver, seen, record


def runner_for(httpserver, **kw):
    return ArgoRunner(httpserver.url_for("/"), "ml", token=TOKEN, backoff=0.01, **kw)


def doc():
    return workflow_dict({"credit": {"anomaly_detection": {"n_estimators": 50}}},
                         WorkflowOptions(namespace="ml", image="reg/enricher:1"), name="enrich-credit-0001")


def test_submit_posts_the_workflow_to_the_namespace_with_the_token(argo):
    server, seen, record = argo

    def created(request):
        record(request)
        return Response(json.dumps(json.loads(request.data)["workflow"]), content_type="application/json")

    server.expect_request("/api/v1/workflows/ml", method="POST").respond_with_handler(created)
    assert runner_for(server).submit(doc()) == "enrich-credit-0001"
    [(method, path, body)] = seen
    assert body["namespace"] == "ml" and body["workflow"]["metadata"]["name"] == "enrich-credit-0001"
    assert body["workflow"]["spec"]["templates"] == doc()["spec"]["templates"]


def error_answer(record, status: int, message: str):
    """A handler that checks the request, then answers as the Argo Server does on an error."""
    def handle(request):
        record(request)
        return Response(json.dumps({"code": 2, "message": message}), status=status, content_type="application/json")
    return handle


def test_a_refused_token_is_a_clear_error_and_not_retried(argo):
    server, seen, record = argo

    server.expect_request("/api/v1/workflows/ml", method="POST").respond_with_handler(
        error_answer(record, 401, "token not valid"))
    with pytest.raises(RunnerError, match="refused the token.*ENRICHER_ARGO_TOKEN"):
        runner_for(server).submit(doc())
    assert len(seen) == 1


def test_server_errors_are_retried_and_a_409_on_a_retry_is_our_own_submission(argo):
    server, seen, record = argo
    answers = iter([(500, {"code": 13, "message": "etcd timeout"}), (409, {"code": 6, "message": "exists"})])

    def flaky(request):
        record(request)
        status, body = next(answers)
        return Response(json.dumps(body), status=status, content_type="application/json")

    server.expect_request("/api/v1/workflows/ml", method="POST").respond_with_handler(flaky)
    assert runner_for(server).submit(doc()) == "enrich-credit-0001"
    assert len(seen) == 2


def test_a_409_on_the_first_attempt_is_a_name_clash_and_persistent_500s_give_up(argo):
    server, seen, record = argo
    server.expect_request("/api/v1/workflows/ml", method="POST").respond_with_handler(
        error_answer(record, 409, "already exists"))
    with pytest.raises(RunnerError, match="already exists in namespace ml .409."):
        runner_for(server).submit(doc())
    server.clear()
    server.expect_request("/api/v1/workflows/ml", method="POST").respond_with_handler(
        error_answer(record, 500, "internal"))
    with pytest.raises(RunnerError, match="failed after 3 attempts"):
        runner_for(server, retries=2).submit(doc())
    assert len(seen) == 1 + 3


def test_status_follows_the_phase_and_names_the_failing_step(argo):
    server, seen, record = argo
    failed = {"metadata": {"name": "enrich-credit-0001", "namespace": "ml"},
              "spec": {"entrypoint": "run", "templates": []},
              "status": {"phase": "Failed", "message": "child failed", "nodes": {
                  "n1": {"id": "n1", "name": "enrich-credit-0001.prepare", "displayName": "prepare", "type": "Pod",
                         "phase": "Succeeded"},
                  "n2": {"id": "n2", "name": "enrich-credit-0001.train-anomaly-detection",
                         "displayName": "train-anomaly-detection", "type": "Retry", "phase": "Failed",
                         "message": "No more retries left"},
                  "n3": {"id": "n3", "name": "enrich-credit-0001.train-anomaly-detection(2)",
                         "displayName": "train-anomaly-detection(2)", "type": "Pod", "phase": "Failed",
                         "message": "Error (exit code 1)"}}}}

    def get(request):
        record(request)
        return Response(json.dumps(failed), content_type="application/json")

    server.expect_request("/api/v1/workflows/ml/enrich-credit-0001", method="GET").respond_with_handler(get)
    status = runner_for(server).status("enrich-credit-0001")
    assert status.phase == "Failed" and status.done
    assert status.failed_step == "train-anomaly-detection" and status.message == "No more retries left"
    assert status.steps == {"prepare": "Succeeded", "train-anomaly-detection": "Failed"}


def test_stop_stops_the_workflow_so_its_exit_handler_still_cleans_up(argo):
    server, seen, record = argo

    def stop(request):
        record(request)
        return Response(json.dumps({"metadata": {"name": "enrich-credit-0001"}, "spec": {"entrypoint": "run"}}),
                        content_type="application/json")

    server.expect_request("/api/v1/workflows/ml/enrich-credit-0001/stop", method="PUT") \
        .respond_with_handler(stop)
    runner_for(server).stop("enrich-credit-0001")
    assert seen == [("PUT", "/api/v1/workflows/ml/enrich-credit-0001/stop",
                     {"name": "enrich-credit-0001", "namespace": "ml", "message": "superseded by a newer run"})]


def test_a_url_without_scheme_is_refused():
    with pytest.raises(RunnerError, match="expected http"):
        ArgoRunner("argo:2746", "ml")
