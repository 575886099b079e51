"""Where a training workflow runs.

- LocalRunner (the embedded default): executes the Workflow document's DAG on
  this machine, each task's container command as a local process, in
  dependency order, with the template's retries. No cluster needed.
- ArgoRunner: submits the same document to an Argo Server over its REST API
  and follows it there.

Both take the document pipelines/workflow.py builds and report a RunStatus:
phase (Pending, Running, Succeeded, Failed, Error), and for a failure the
step that failed and why.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from enricher.errors import EnricherError

DONE = ("Succeeded", "Failed", "Error")
ON_EXIT = "onExit"  # the exit handler's entry in RunStatus.steps (Argo shows it as <workflow>.onExit)


DEADLINE_EXCEEDED = -1000  # not an exit code: the attempt was killed at its deadline
_EXPRESSION = re.compile(r"^\s*asInt\(lastRetry\.exitCode\)\s*(==|!=|<=|>=|<|>)\s*(-?\d+)\s*$")


def _retry_condition(expression: str | None):
    """Argo's retryStrategy.expression, for the form our workflows use
    (`asInt(lastRetry.exitCode) != N`): whether to retry after an exit code.
    A killed attempt has no exit code; Argo's asInt then gives -1."""
    if not expression:
        return lambda code: True
    m = _EXPRESSION.match(expression)
    if not m:
        raise RunnerError(f"the local runner cannot evaluate retryStrategy.expression {expression!r} "
                          "(it knows asInt(lastRetry.exitCode) compared to a number)")
    op, value = m.group(1), int(m.group(2))
    compare = {"==": int.__eq__, "!=": int.__ne__, "<": int.__lt__, ">": int.__gt__, "<=": int.__le__,
               ">=": int.__ge__}[op]
    return lambda code: compare(-1 if code == DEADLINE_EXCEEDED else code, value)


class RunnerError(EnricherError, RuntimeError):
    """A runner could not do what was asked; the message says what to fix."""


@dataclass
class RunStatus:
    name: str
    phase: str = "Pending"
    failed_step: str | None = None
    message: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    steps: dict[str, str] = field(default_factory=dict)  # task -> phase
    attempts: dict[str, int] = field(default_factory=dict)  # task -> attempts made (local runner)
    messages: dict[str, str] = field(default_factory=dict)  # task -> why it failed

    def failure(self, tasks: list[str]) -> tuple[str, str | None] | None:
        """(task, message) of the first of `tasks` that failed, if any did."""
        for task in tasks:
            if self.steps.get(task) in ("Failed", "Error"):
                return task, self.messages.get(task, self.message)
        return None

    @property
    def done(self) -> bool:
        return self.phase in DONE


def dag_order(workflow: dict) -> list[tuple[dict, dict]]:
    """The entrypoint DAG's tasks with their templates, dependencies first."""
    spec = workflow["spec"]
    templates = {t["name"]: t for t in spec["templates"]}
    entry = templates.get(spec["entrypoint"])
    if not entry or "dag" not in entry:
        raise RunnerError(f"entrypoint {spec['entrypoint']!r} is not a DAG template")
    tasks = {t["name"]: t for t in entry["dag"]["tasks"]}
    needs = {}
    for name, task in tasks.items():
        expr = task.get("depends", "") or ""
        deps = [d.strip() for d in expr.split("&&") if d.strip()]
        if any(not re.fullmatch(r"[A-Za-z0-9-]+", d) for d in deps):
            raise RunnerError(f"task {name}: depends {expr!r}: the local runner follows 'a && b' only")
        unknown = [d for d in deps if d not in tasks]
        if unknown:
            raise RunnerError(f"task {name} depends on unknown task(s) {unknown}")
        needs[name] = set(deps)
    order, ready = [], deque(sorted(n for n, d in needs.items() if not d))
    placed = set()
    while ready:
        name = ready.popleft()
        order.append(name)
        placed.add(name)
        for other in sorted(needs):
            if other not in placed and other not in ready and needs[other] <= placed:
                ready.append(other)
    if len(order) != len(tasks):
        raise RunnerError(f"the DAG has a cycle among {sorted(set(tasks) - placed)}")
    return [(tasks[n], templates[tasks[n]["template"]]) for n in order]


def _substitute(text: str, values: dict[str, str]) -> str:
    def repl(m):
        key = m.group(1).strip()
        if key not in values:
            raise RunnerError(f"no value for {{{{{key}}}}}")
        return values[key]
    return re.sub(r"\{\{([^}]+)\}\}", repl, text)


class LocalRunner:
    """Runs workflows as local processes, one workflow's steps one after another."""

    def __init__(self, env: dict[str, str] | None = None, python: str = sys.executable):
        self.env = env or {}
        self.python = python
        self._runs: dict[str, RunStatus] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._stop: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def command(self, container: dict) -> list[str]:
        """The container's command as a local one: `enricher ...` runs this package's CLI."""
        argv = list(container.get("command", [])) + list(container.get("args", []))
        if argv and argv[0] == "enricher":
            return [self.python, "-m", "enricher.cli", *argv[1:]]
        return argv

    def submit(self, workflow: dict) -> str:
        name = workflow["metadata"].get("name")
        if not name:
            raise RunnerError("the local runner needs a named workflow (metadata.name)")
        plan = dag_order(workflow)  # refuse a bad document before anything runs
        with self._lock:
            if name in self._runs and not self._runs[name].done:
                raise RunnerError(f"workflow {name} is already running")
            self._runs[name] = RunStatus(name, "Running", started_at=time.time(),
                                         steps={t["name"]: "Pending" for t, _ in plan})
            self._stop[name] = threading.Event()
        threading.Thread(target=self._run, args=(workflow, plan), name=f"run-{name}", daemon=True).start()
        return name

    def _run(self, workflow: dict, plan) -> None:
        """The DAG as Argo runs it, one task at a time: a task runs when every task it
        depends on succeeded, else it is Omitted; after a failure, a DAG that fails
        fast (Argo's default) starts nothing more, one with failFast: false runs
        every branch the failure does not reach. The exit handler (spec.onExit)
        runs last, however the DAG ended."""
        name = workflow["metadata"]["name"]
        status, stop = self._runs[name], self._stop[name]
        spec = workflow["spec"]
        params = {f"workflow.parameters.{p['name']}": str(p.get("value", ""))
                  for p in spec.get("arguments", {}).get("parameters", [])}
        params["workflow.name"] = name
        dag = next(t for t in spec["templates"] if t["name"] == spec["entrypoint"])["dag"]
        fail_fast = dag.get("failFast", True)
        failure: tuple[str, str, str] | None = None  # (phase, task, message) of the first failure
        for task, template in plan:
            task_name = task["name"]
            needs = [d.strip() for d in (task.get("depends") or "").split("&&") if d.strip()]
            if stop.is_set() or (failure and fail_fast) or \
                    any(status.steps.get(d) != "Succeeded" for d in needs):
                status.steps[task_name] = "Omitted"
                continue
            phase, message = self._task(name, task, template, params, status, stop)
            status.steps[task_name] = phase
            if phase != "Succeeded":
                status.messages[task_name] = message
                failure = failure or (phase, task_name, message)
        if stop.is_set():
            failure = ("Failed", failure[1] if failure else None, "stopped (superseded)")
        handler = spec.get("onExit")
        if handler:
            template = next((t for t in spec["templates"] if t["name"] == handler), None)
            if template is None:
                phase, message = "Error", f"onExit names no template {handler!r}"
            else:
                phase, message = self._task(name, {"name": ON_EXIT}, template, params, status, threading.Event())
            status.steps[ON_EXIT] = phase
            if phase != "Succeeded":
                status.messages[ON_EXIT] = message
                failure = failure or (phase, ON_EXIT, message)
        if failure:
            return self._finish(status, *failure)
        self._finish(status, "Succeeded", None, None)

    def _task(self, name: str, task: dict, template: dict, params: dict, status: RunStatus,
              stop: threading.Event) -> tuple[str, str | None]:
        """Run one task's container with its template's retries: (phase, message)."""
        values = dict(params)
        for p in task.get("arguments", {}).get("parameters", []):
            values[f"inputs.parameters.{p['name']}"] = str(p.get("value", ""))
        container = template.get("container")
        if container is None:
            return "Error", "the local runner runs container templates only"
        try:
            argv = [_substitute(a, values) for a in self.command(container)]
            retry_if = _retry_condition((template.get("retryStrategy") or {}).get("expression"))
        except RunnerError as exc:
            return "Error", str(exc)
        env = {**os.environ, **self.env, **{e["name"]: e.get("value", "") for e in container.get("env", [])}}
        attempts = int((template.get("retryStrategy") or {}).get("limit", 0)) + 1
        deadline = template.get("activeDeadlineSeconds")
        status.steps[task["name"]] = "Running"
        for attempt in range(1, attempts + 1):
            if stop.is_set():
                return "Failed", "stopped (superseded)"
            status.attempts[task["name"]] = attempt
            code, tail = self._exec(name, argv, env, deadline)
            if code == 0:
                return "Succeeded", None
            if stop.is_set():
                return "Failed", "stopped (superseded)"
            if code == DEADLINE_EXCEEDED:
                tail = f"exceeded its deadline of {deadline}s (activeDeadlineSeconds) and was killed"
            if not retry_if(code):
                attempts = attempt  # a failure a retry will not change: as Argo's expression says
                break
            if attempt < attempts:
                time.sleep(min(2 ** (attempt - 1), 10))  # Argo's retries back off too
        what = f"exit {code}" if code != DEADLINE_EXCEEDED else "deadline"
        return "Failed", f"{what} after {attempts} attempt(s): {tail}"

    def _exec(self, name: str, argv: list[str], env: dict, deadline: float | None = None) -> tuple[int, str]:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        self._procs[name] = proc
        try:
            _, err = proc.communicate(timeout=float(deadline) if deadline else None)
        except subprocess.TimeoutExpired:  # past its deadline: the whole step (its process group) goes
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            return DEADLINE_EXCEEDED, ""
        lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
        return proc.returncode, (lines[-1] if lines else "")

    def _finish(self, status: RunStatus, phase: str, step: str | None, message: str | None) -> None:
        status.phase, status.failed_step, status.message = phase, step, message
        status.finished_at = time.time()

    def status(self, name: str) -> RunStatus:
        try:
            return self._runs[name]
        except KeyError:
            raise RunnerError(f"no workflow {name!r} was submitted here") from None

    def stop(self, name: str) -> None:
        """Stop a running workflow (a newer one supersedes it); its current step is killed."""
        if name not in self._runs or self._runs[name].done:
            return
        self._stop[name].set()
        proc = self._procs.get(name)
        if proc and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def wait(self, name: str, timeout: float = 600.0) -> RunStatus:
        deadline = time.monotonic() + timeout
        while not self.status(name).done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"workflow {name} still {self.status(name).phase} after {timeout}s")
            time.sleep(0.1)
        return self.status(name)


def _task_of(display_name: str) -> str:
    """The DAG task an Argo node belongs to: `train-x(1)` (an attempt) is train-x,
    `<workflow>.onExit` is the exit handler."""
    if display_name.endswith(".onExit"):
        return ON_EXIT
    return re.sub(r"\(\d+\)$", "", display_name)


class ArgoRunner:
    """Submits workflows to an Argo Server over its REST API (through hera's
    client) and follows them there.

    A refused token (401, 403) or a request the server rejects (400) is an
    error at once, saying what to fix; a server error (5xx) or a connection
    that fails is retried with back-off. A 409 on a retried submission is our
    own earlier attempt that got through: it counts as submitted.
    """

    def __init__(self, url: str, namespace: str, token: str | None = None, verify=True,
                 retries: int = 3, backoff: float = 1.0, client_certs: tuple[str, str] | None = None):
        from hera.workflows import WorkflowsService

        if not url.startswith(("http://", "https://")):
            raise RunnerError(f"Argo Server URL {url!r}: expected http(s)://HOST:PORT")
        self.url = url.rstrip("/") + "/"  # hera joins API paths onto it
        self.namespace = namespace
        self.retries = retries
        self.backoff = backoff
        self.service = WorkflowsService(host=self.url, token=token, verify_ssl=verify, namespace=namespace,
                                        client_certs=client_certs)

    def _call(self, what: str, fn, name: str | None = None):
        import requests
        from hera.exceptions import AlreadyExists, BadRequest, Forbidden, HeraException, NotFound, Unauthorized

        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Unauthorized as exc:
                raise RunnerError(f"Argo Server at {self.url} refused the token for {what} (401): set "
                                  f"ENRICHER_ARGO_TOKEN (or _FILE) to a valid bearer token") from exc
            except Forbidden as exc:
                raise RunnerError(f"Argo Server at {self.url} forbids {what} in namespace {self.namespace} "
                                  f"(403): the token's service account needs workflow rights there") from exc
            except AlreadyExists as exc:
                if what == "submit" and attempt > 0:
                    return None  # our earlier attempt got through before its answer was lost
                raise RunnerError(f"Argo Server at {self.url}: a workflow named {name} already exists in "
                                  f"namespace {self.namespace} (409)") from exc
            except NotFound as exc:
                raise RunnerError(f"Argo Server at {self.url}: {what}: not found ({exc})") from exc
            except BadRequest as exc:
                raise RunnerError(f"Argo Server at {self.url} rejected {what} (400): {exc}") from exc
            except Exception as exc:  # 5xx, connection errors, timeouts
                # hera has a class for 500 only; 502/503/504 come as a plain HeraException naming the code.
                retryable = isinstance(exc, (requests.ConnectionError, requests.Timeout)) or \
                    (isinstance(exc, HeraException) and "status code 5" in str(exc))
                if not retryable:
                    raise RunnerError(f"Argo Server at {self.url}: {what} failed: {exc}") from exc
                if attempt == self.retries:
                    raise RunnerError(f"Argo Server at {self.url}: {what} failed after {attempt + 1} "
                                      f"attempts: {exc}") from exc
                time.sleep(self.backoff * 2 ** attempt)

    def submit(self, workflow: dict) -> str:
        from hera.workflows.models import Workflow as WorkflowModel
        from hera.workflows.models import WorkflowCreateRequest

        name = workflow["metadata"].get("name")
        body = dict(workflow, metadata={**workflow["metadata"], "namespace": self.namespace})
        request = WorkflowCreateRequest(workflow=WorkflowModel.model_validate(body), namespace=self.namespace)
        created = self._call("submit", lambda: self.service.create_workflow(request, namespace=self.namespace), name)
        return created.metadata.name if created is not None and created.metadata.name else name

    def status(self, name: str) -> RunStatus:
        wf = self._call(f"reading workflow {name}", lambda: self.service.get_workflow(name, namespace=self.namespace))
        st = wf.status
        phase = (st.phase if st and st.phase else "Pending")
        out = RunStatus(name, phase, message=st.message if st else None)
        nodes = (st.nodes or {}) if st else {}
        for node in nodes.values():
            if node.type in ("Pod", "Retry", "Skipped") and node.display_name:
                task = _task_of(node.display_name)
                if node.type == "Retry" or task not in out.steps:
                    out.steps[task] = node.phase or "Pending"
                    if node.phase in ("Failed", "Error") and node.message:
                        out.messages[task] = node.message
        failed = [n for n in nodes.values() if n.phase in ("Failed", "Error") and n.type in ("Retry", "Pod")]
        if phase in ("Failed", "Error") and failed:
            node = next((n for n in failed if n.type == "Retry"), failed[0])
            out.failed_step = _task_of(node.display_name or node.name or "")
            out.message = node.message or out.message
        return out

    def stop(self, name: str) -> None:
        """Stop, not terminate: Argo then still runs the exit handler, which removes
        the run's staging (terminate skips exit handlers)."""
        from hera.workflows.models import WorkflowStopRequest

        request = WorkflowStopRequest(name=name, namespace=self.namespace, message="superseded by a newer run")
        try:
            self._call(f"stopping workflow {name}",
                       lambda: self.service.stop_workflow(name, request, namespace=self.namespace))
        except RunnerError as exc:
            if "not found" not in str(exc):
                raise

    def wait(self, name: str, timeout: float = 3600.0, interval: float = 5.0) -> RunStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(name)
            if status.done:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"workflow {name} still {status.phase} after {timeout}s")
            time.sleep(interval)
