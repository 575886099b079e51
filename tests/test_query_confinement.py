"""/query confined by the engine: what a token holder can and cannot make the worker do.

Against a running worker on the embedded store (and, at the end, through the
HTTP front end that stands in for a ClickHouse server): a corpus of escape
attempts, each refused or answered without touching the outside (no file
read or written, no URL reached, no table created or dropped, no secret in
the answer); the limits the engine enforces (time, rows, memory); the
bounded query pool; no answer carrying another's bytes; references and model
files only from where they may come.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from enricher import sample
from enricher.broker import free_port
from enricher.config import ConfigError, Settings
from enricher.store.sqlguard import STORE_TABLES, Guard, QueryRefused, function_allowed
from enricher.stream.topics import ensure_topics
from enricher.supervise import WorkerProcess

from .clickhouse_http import ClickHouseHTTP
from .conftest import register_sample
from .hostile_queries import corpus
from .test_stream import produce

pytestmark = pytest.mark.timeout(900)
TOKEN = "confine-t0ken"
SECRET = "s3cret-canary-" + "7f3a9c"


class Listener:
    """A TCP listener on loopback that counts who connects (and answers nothing)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.calls = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.calls += 1
            conn.close()

    def close(self):
        self.sock.close()


def post(url, path, body, token=TOKEN, raw=None, method="POST"):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def ask(url, sql):
    status, text, headers = post(url, "/query", {"sql": sql})
    return status, json.loads(text), headers


@pytest.fixture(scope="module")
def live(tmp_path_factory, broker):
    tmp = tmp_path_factory.mktemp("confine")
    roots = tmp / "refs"
    roots.mkdir()
    settings = Settings.from_env(env={}, data_dir=str(tmp / "data"), broker=broker.url, http_port=free_port(),
                                 inference_topic="confine-in", dlq_topic="confine-dlq",
                                 control_topic="confine-control", consumer_group="confine",
                                 session_timeout=6.0, topic_partitions=1, api_token=TOKEN,
                                 query_max_seconds=1.0, query_max_rows=1000, query_concurrency=2, query_queue=2,
                                 query_max_memory=256 * 1024 * 1024, reference_roots=str(roots),
                                 refresh_interval=0.5)
    register_sample(settings, roots)
    ensure_topics(settings)
    produce(settings, sample.inferences(500)[0], batch="json")
    canary = tmp / "canary.txt"
    canary.write_text(SECRET + "\n")
    listener = Listener()
    worker = WorkerProcess(settings, log_path=tmp / "worker.log",
                           extra_env={"ENRICHER_API_TOKEN": TOKEN, "ENRICHER_CANARY_SECRET": SECRET}).start()
    worker.wait_for(lambda s: s["enriched"] >= 500, timeout=180)
    yield dict(settings=settings, url=worker.url, worker=worker, tmp=tmp, canary=canary, listener=listener,
               roots=roots)
    worker.stop()
    listener.close()


HEAVY = ("SELECT count() FROM enricher.{m} AS a, enricher.{m} AS b, enricher.{m} AS c, enricher.{m} AS d "
         "WHERE a.f0 + b.f1 > c.f2 + d.f3 + 1e9").format(m=sample.MODEL_ID)


def test_every_escape_attempt_is_refused_and_touches_nothing(live):
    url, canary, listener = live["url"], live["canary"], live["listener"]
    out = live["tmp"] / "written-by-a-query.csv"
    attempts = corpus(str(canary), str(out), listener.port, sample.MODEL_ID)
    assert len(attempts) > 400
    answered = {}
    for sql in attempts:
        status, text, _ = post(url, "/query", {"sql": sql})
        assert SECRET not in text, sql
        answered[sql] = (status, text)
    # Nothing of it ran but what is harmless: a string that only looks like a statement, read as a string.
    ran = {sql: json.loads(t) for sql, (status, t) in answered.items() if status != 400}
    assert all(status in (200, 400) for status, _ in answered.values())
    assert all(len(doc["rows"]) == 1 and all(isinstance(v, str) for v in doc["rows"][0])
               for doc in ran.values()), ran
    refused = sum(json.loads(t)["error"].startswith("query refused:") for status, t in answered.values()
                  if status == 400)
    assert refused >= 0.9 * len(attempts)
    assert listener.calls == 0, "no URL was reached"
    assert not out.exists(), "no file was written"
    assert canary.read_text() == SECRET + "\n"
    # no table created or dropped: the model's rows are all there and no other table appeared
    status, doc, _ = ask(url, f"SELECT count() FROM enricher.{sample.MODEL_ID}")
    assert (status, doc["rows"]) == (200, [[500]])
    status, doc, _ = ask(url, "SELECT count() FROM enricher.pwn")
    assert status == 400 and "UNKNOWN_TABLE" in doc["error"]
    assert SECRET not in (live["tmp"] / "worker.log").read_text()


def test_the_escape_that_was_found_is_refused_naming_the_file_function(live):
    sql = ("SELECT \u2018 = 'y\u2019 AS a, line FROM file(\u2018/etc/passwd\u2019, LineAsString) "
           "WHERE line != \u2018z' OR \u2019")
    status, doc, _ = ask(live["url"], sql)
    assert status == 400 and doc["error"] == ("query refused: table function file() is not allowed: read "
                                              "enricher.<model_id> or enricher_store.enriched")


def test_the_engine_enforces_rows_time_and_memory(live):
    url = live["url"]
    # one block of a million rows: cut at the row limit, and the answer says so
    status, doc, _ = ask(url, "SELECT arrayJoin(range(1000000)) AS n")
    assert (status, len(doc["rows"]), doc["truncated"], doc["row_limit"]) == (200, 1000, True, 1000)
    assert doc["rows"][:3] == [[0], [1], [2]]
    status, doc, _ = ask(url, f"SELECT count() AS n FROM enricher.{sample.MODEL_ID}")
    assert (status, doc["truncated"]) == (200, False)
    # time: a cross join stopped by the engine at ENRICHER_QUERY_MAX_SECONDS
    status, doc, _ = ask(url, HEAVY)
    assert status == 400 and "TIMEOUT_EXCEEDED" in doc["error"]
    # memory: stopped at ENRICHER_QUERY_MAX_MEMORY
    status, doc, _ = ask(url, "SELECT length(arrayMap(x -> repeat('a', 1000000), range(1000))) AS n")
    assert status == 400 and "MEMORY_LIMIT_EXCEEDED" in doc["error"]
    # and no query lifts them: SETTINGS after a set operator is refused
    for sql in [f"{HEAVY} UNION ALL SELECT 1 SETTINGS max_execution_time = 0",
                "SELECT 1 UNION ALL SELECT arrayJoin(range(1000000)) SETTINGS max_result_rows = 0",
                "SELECT 1 EXCEPT SELECT 2 SETTINGS max_memory_usage = 0"]:
        status, doc, _ = ask(url, sql)
        assert status == 400 and "SETTINGS clause is not allowed" in doc["error"], sql


def test_no_answer_carries_another_callers_bytes(live):
    url = live["url"]
    results: dict[str, tuple] = {}

    def heavy(i):
        results[f"heavy{i}"] = ask(url, HEAVY)[:2]

    def marker(i):
        results[f"m{i}"] = ask(url, f"SELECT {i} AS m{i}, 'marker-{i}' AS s")[:2]

    for i in range(8):
        # a timed-out query, then another on the same pool, and two at once
        heavy(i)
        marker(i)
        threads = [threading.Thread(target=heavy, args=(100 + i,)), threading.Thread(target=marker, args=(100 + i,))]
        [t.start() for t in threads]
        [t.join() for t in threads]
    for name, (status, doc) in results.items():
        if name.startswith("heavy"):
            assert status == 400 and "TIMEOUT_EXCEEDED" in doc["error"], name
        else:
            i = int(name[1:])
            assert (status, doc["columns"], doc["rows"]) == (200, [f"m{i}", "s"], [[i, f"marker-{i}"]]), name


def test_a_full_query_pool_answers_429_with_retry_after_and_the_stream_goes_on(live):
    url, settings, worker = live["url"], live["settings"], live["worker"]
    answers = []
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            status, _, headers = post(url, "/query", {"sql": HEAVY})
            answers.append((status, headers.get("Retry-After")))
            if status == 429:
                time.sleep(0.05)

    before = worker.status()["enriched"]
    threads = [threading.Thread(target=hammer) for _ in range(6)]
    [t.start() for t in threads]
    try:
        time.sleep(0.5)
        # While the pool is full, the stream enriches what arrives and the API answers.
        produce(settings, sample.inferences(2000, id_prefix="under-load")[0], batch="json")
        status = worker.wait_for(lambda s: s["enriched"] >= before + 2000, timeout=120)
        models_status, _, _ = post(url, "/models", None, raw=b"", method="GET")
        queries_meanwhile = len(answers)
    finally:
        stop.set()
        [t.join() for t in threads]
    assert status["enriched"] == before + 2000 and models_status == 200
    assert queries_meanwhile > 0
    assert {s for s, _ in answers} <= {400, 429}
    busy = [retry for s, retry in answers if s == 429]
    assert busy and all(retry is not None and int(retry) >= 1 for retry in busy)


def test_a_body_over_the_cap_is_refused_saying_the_cap(live):
    status, text, _ = post(live["url"], "/query", None, raw=b'{"sql": "' + b"x" * (2 * 1024 ** 2) + b'"}')
    assert status == 413 and "1 MiB" in json.loads(text)["error"] and "1,048,576" in json.loads(text)["error"]
    status, text, _ = post(live["url"], f"/models/{sample.MODEL_ID}", None, raw=b"[" * (2 * 1024 ** 2), method="PUT")
    assert status == 413 and "1 MiB" in json.loads(text)["error"]


def test_references_and_model_files_only_from_where_they_may_come(live):
    url, listener, roots, tmp = live["url"], live["listener"], live["roots"], live["tmp"]
    reference = roots / "ok.parquet"
    pq.write_table(sample.reference_table(300), reference)
    outside = tmp / "outside.parquet"
    pq.write_table(sample.reference_table(300), outside)
    (roots / "link.parquet").symlink_to(outside)

    def put(ref, model_file=None):
        body = {"schema": sample.SCHEMA, "reference": ref}
        if model_file:
            body["model_file"] = model_file
        status, text, _ = post(url, "/models/located", body, method="PUT")
        return status, json.loads(text)

    refusals = {}
    for ref in [f"s3://bucket/k.parquet?endpoint_override=127.0.0.1:{listener.port}&scheme=http",
                "s3://user:pw@bucket/k.parquet", f"s3://bucket:{listener.port}/k.parquet", "s3://bucket/../k.parquet",
                "s3://bucket/a%2F..%2F..%2Fother/k.parquet",
                f"http://127.0.0.1:{listener.port}/k.parquet", "file:///etc/passwd", f"file://{outside}",
                "hdfs://127.0.0.1:1/k.parquet", str(outside), "/etc/passwd", "/nonexistent/x.parquet",
                str(roots / "link.parquet"), str(roots / ".." / "outside.parquet"), "ok.parquet"]:
        status, doc = put(ref)
        assert status == 400 and doc["field"] == "reference" and "not allowed" in doc["error"], ref
        refusals[ref] = doc["error"]
    # the answer does not tell which files exist
    assert refusals[str(outside)] == refusals["/nonexistent/x.parquet"] == refusals["/etc/passwd"]
    status, doc = put(str(reference), model_file=f"s3://bucket/m.json?endpoint_override=127.0.0.1:{listener.port}")
    assert status == 400 and doc["field"] == "model_file" and "not allowed" in doc["error"]
    assert listener.calls == 0, "no host was called"
    status, doc = put(str(reference))
    assert status == 201 and doc["model_id"] == "located"


# -- the guard against the engine's own plan (no worker) ----------------------

TABLES = [f"enricher.{sample.MODEL_ID}", "enricher_store.enriched", "enricher_store.labels", "system.one",
          "system.tables", "default.t", "enricher_store.label_sweeps", "t", "numbers(5)", "file('/etc/hostname')",
          "url('http://127.0.0.1:1/', CSV, 'a String')", "merge('enricher', '.*')", "(SELECT 1 AS f0)"]
EXPRESSIONS = ["f0", "f1 + 1", "count()", "sum(f0)", "avg(anomaly_score)", "toString(f0)", "hostName()",
               "getSetting('readonly')", "file('/etc/hostname')", "currentDatabase()", "version()",
               "arrayMap(x -> x + 1, [1, 2])", "quantile(0.5)(f0)", "1 IN (1, 2)", "f0 IN system.one",
               "(SELECT count() FROM system.tables)", "(SELECT max(f0) FROM enricher_store.enriched)",
               "dictGet('d', 'x', 1)", "if(f0 > 0, 'a', 'b')", "tuple(1, 'a').1", "now()"]


@st.composite
def statements(draw):
    cols = draw(st.lists(st.sampled_from(EXPRESSIONS), min_size=1, max_size=3))
    table = draw(st.sampled_from(TABLES))
    sql = f"SELECT {', '.join(cols)} FROM {table}"
    if draw(st.booleans()):
        sql += f" WHERE {draw(st.sampled_from(EXPRESSIONS))}"
    if draw(st.booleans()):
        other = draw(st.sampled_from(TABLES))
        sql = draw(st.sampled_from([f"{sql} UNION ALL SELECT {cols[0]} FROM {other}",
                                    f"WITH t AS (SELECT * FROM {other}) {sql}",
                                    f"SELECT * FROM ({sql}) AS s JOIN {other} AS o ON 1 = 1"]))
    return sql


@pytest.fixture
def store(tmp_path):
    """A store with the layout's databases and one model's view, for the engine's own plans
    (per test: chDB opens one data directory per process at a time)."""
    import clickhouse_connect

    path = tmp_path / "fuzz-store"
    client = clickhouse_connect.get_client(interface="chdb", path=str(path))
    client.command("CREATE DATABASE enricher_store")
    client.command("CREATE DATABASE enricher")
    client.command("CREATE TABLE enricher_store.enriched (model_id String, f0 Float64, f1 Float64, "
                   "anomaly_score Float64) ENGINE = MergeTree ORDER BY model_id")
    client.command("CREATE TABLE enricher_store.labels (inference_id String, label Float64) ENGINE = MergeTree "
                   "ORDER BY inference_id")
    client.command(f"CREATE VIEW enricher.{sample.MODEL_ID} AS SELECT f0, f1, anomaly_score FROM "
                   "enricher_store.enriched")
    client.command("INSERT INTO enricher_store.enriched VALUES ('m', 1, 2, 0.5)")
    yield client
    client.close()


_PLAN_TABLE = re.compile(r"table_name: ([^,\s]+)")
_PLAN_TABLE_FUNCTION = re.compile(r"table_function_name: ([^,\s]+)")
_PLAN_FUNCTION = re.compile(r"function_name: ([^,\s]+)")


@hsettings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.too_slow])
@given(sql=statements())
def test_whatever_the_guard_lets_through_the_engines_plan_reads_only_allowed_tables(store, sql):
    try:
        plan = Guard("enricher", 100).plan(store, sql)
    except QueryRefused:
        return
    # The analyzer's plan of exactly what would run, with the views' database current.
    store.database = "enricher"
    try:
        tree = "\n".join(r[0] for r in store.query(f"EXPLAIN QUERY TREE {plan.sql}").result_rows)
    except Exception as exc:  # noqa: BLE001 - a statement the engine itself refuses reads nothing
        assert "UNKNOWN" in str(exc) or "NOT_AN_AGGREGATE" in str(exc) or "Code:" in str(exc), exc
        return
    finally:
        store.database = "default"
    # (a SELECT with no FROM reads the engine's one-row table system.one: nothing of anyone's)
    allowed = {f"enricher.{sample.MODEL_ID}", "system.one"} | {f"enricher_store.{t}" for t in STORE_TABLES}
    assert set(_PLAN_TABLE.findall(tree)) <= allowed, (sql, tree)
    assert _PLAN_TABLE_FUNCTION.findall(tree) == [], (sql, tree)
    assert all(function_allowed(f) or f.startswith("_") for f in _PLAN_FUNCTION.findall(tree)), (sql, tree)


# -- a ClickHouse server ------------------------------------------------------

def test_on_a_server_query_is_off_unless_asked_and_then_needs_a_read_only_user(tmp_path):
    server = dict(data_dir=str(tmp_path), clickhouse_url="http://default:@127.0.0.1:1/enricher")
    assert not Settings.from_env(env={}, **server).query_endpoint_on
    assert Settings.from_env(env={}, data_dir=str(tmp_path)).query_endpoint_on  # the embedded store
    with pytest.raises(ConfigError, match="ENRICHER_QUERY_USER"):
        Settings.from_env(env={}, query_endpoint="on", **server)
    on = Settings.from_env(env={"ENRICHER_QUERY_PASSWORD": "pw"}, query_endpoint="on", query_user="analyst",
                           **server)
    assert on.query_endpoint_on and on.query_user == "analyst"


def test_enricher_schema_prints_a_read_only_user_the_engine_parses_without_its_password(tmp_path, store):
    env = {**os.environ, "ENRICHER_DATA_DIR": str(tmp_path), "ENRICHER_QUERY_USER": "analyst",
           "ENRICHER_QUERY_PASSWORD": "pa55-word", "ENRICHER_QUERY_MAX_SECONDS": "12"}
    done = subprocess.run([sys.executable, "-m", "enricher.cli", "schema", "--query-user"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pa55-word" not in done.stdout
    statements = [s.strip() for s in done.stdout.split(";\n") if s.strip()]
    for statement in statements:  # each parses with ClickHouse's own parser
        store.query("SELECT formatQuerySingleLine({q:String})", parameters={"q": statement})
    profile = next(s for s in statements if s.startswith("CREATE SETTINGS PROFILE"))
    assert "max_execution_time = 12.0 CONST" in profile and "readonly = 2" in profile
    assert "max_memory_usage" in profile and "os_thread_priority = 19 CONST" in profile
    grants = [s for s in statements if s.startswith("GRANT")]
    assert grants == ["GRANT SELECT ON `enricher`.* TO `analyst_reader`"] + [
        f"GRANT SELECT ON `enricher_store`.`{t}` TO `analyst_reader`" for t in STORE_TABLES]
    user = statements[-1]
    digest, salt = re.search(r"sha256_hash BY '([0-9a-f]{64})' SALT '([0-9a-f]+)'", user).groups()
    assert hashlib.sha256(("pa55-word" + salt).encode()).hexdigest() == digest
    env.pop("ENRICHER_QUERY_PASSWORD")
    done = subprocess.run([sys.executable, "-m", "enricher.cli", "schema", "--query-user"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "ENRICHER_QUERY_PASSWORD" in done.stderr


def test_through_a_server_query_runs_as_the_query_user_and_only_what_the_guard_planned(make_settings, tmp_path):
    front = ClickHouseHTTP(tmp_path / "server", users={"analyst": "pa55"}).start()
    try:
        settings = make_settings(clickhouse_url=front.url(), api_token=TOKEN)
        register_sample(settings, tmp_path)
        produce(settings, sample.inferences(200)[0], batch="json")
        env = {"ENRICHER_API_TOKEN": TOKEN}
        worker = WorkerProcess(settings, log_path=tmp_path / "off.log", extra_env=env).start()
        try:
            worker.wait_for(lambda s: s["enriched"] >= 200, timeout=120)
            status, text, _ = post(worker.url, "/query", {"sql": "SELECT 1"})
            assert status == 404 and "ENRICHER_QUERY_ENDPOINT=on" in json.loads(text)["error"]
        finally:
            worker.stop()
        env.update({"ENRICHER_QUERY_ENDPOINT": "on", "ENRICHER_QUERY_USER": "analyst",
                    "ENRICHER_QUERY_PASSWORD": "pa55"})
        worker = WorkerProcess(settings, log_path=tmp_path / "on.log", extra_env=env).start()
        try:
            worker.wait_for(lambda s: s["uptime_s"] >= 0, timeout=120)
            front.seen.clear()
            status, doc, _ = ask(worker.url, f"SELECT count() AS n FROM enricher.{sample.MODEL_ID}")
            assert (status, doc["rows"]) == (200, [[200]])
            canary = tmp_path / "canary.txt"
            canary.write_text(SECRET)
            status, doc, _ = ask(worker.url, f"SELECT \u2018 = 'y\u2019 AS a, line FROM file(\u2018{canary}\u2019, "
                                             "LineAsString) WHERE line != \u2018z' OR \u2019")
            assert status == 400 and SECRET not in json.dumps(doc)
        finally:
            worker.stop()
        analyst = [sql for user, sql in front.seen if user == "analyst"]
        assert analyst, "the queries ran as the query user"
        # the client library's own handshake, the engine's parser (the caller's text only as a
        # parameter), its tree of the planned text, and the planned text of the one allowed query
        handshake = ("SELECT version(), timezone()", "SELECT name, value, readonly FROM system.settings",
                     "SELECT 1 AS check")
        lines = [sql.split("\n")[0] for sql in analyst]
        ran = [sql for sql in lines if not sql.startswith(handshake + ("SELECT formatQuerySingleLine({q:String})",
                                                                       "EXPLAIN AST "))]
        assert ran == [f"SELECT * FROM (SELECT count() AS n FROM enricher.{sample.MODEL_ID}) "
                       f"LIMIT {settings.query_max_rows + 1}"]
    finally:
        front.stop()
