"""The worker's HTTP server: only its own endpoints, a token off loopback,
HTTPS when configured, and a query endpoint that reads the enriched tables
and nothing else (the statements that used to get through, tried for real)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from enricher import sample
from enricher.store.sqlguard import Guard, QueryRefused
from enricher.supervise import WorkerProcess

from .conftest import register_sample
from .test_stream import produce

pytestmark = pytest.mark.timeout(300)
TOKEN = "s3cure-t0ken"

ALLOWED = [
    "SELECT count() FROM enricher.credit_default WHERE anomaly_score > 0.5",
    "SELECT quantile(0.5)(anomaly_score), countIf(f0 > 1), uniqExactIf(inference_id, f1 > 0) FROM enricher.m",
    "WITH t AS (SELECT 1 AS a) SELECT a FROM t",
    "SELECT toStartOfHour(timestamp) AS h, avg(anomaly_score) FROM enricher.m GROUP BY h ORDER BY h",
    "SELECT * FROM enricher.m FINAL LIMIT 5",
    "SELECT _partition, max(_offset) + 1 FROM enricher_store.enriched GROUP BY _partition",
    "SELECT inference_id FROM enricher.m WHERE inference_id IN (SELECT inference_id FROM enricher.m WHERE f0 > 1)",
    "SELECT now() - INTERVAL 1 DAY, CASE WHEN f0 > 1 THEN 'a' ELSE 'b' END FROM enricher.m",
    "DESCRIBE enricher.m",
    "SELECT 1 UNION ALL SELECT 2",
    "SELECT count() FROM enricher.m AS t JOIN enricher.n AS u USING (inference_id)",
    "SELECT x, count() OVER (PARTITION BY x) FROM enricher.m",
]
# Each kind a caller could try, and a word the refusal must contain.
FORBIDDEN = [
    ("SELECT * FROM file('/etc/passwd', 'CSV')", "table function file"),
    ("select * from FILE('/etc/passwd')", "table function"),
    ("SELECT * FROM `file`('/etc/passwd')", "table function"),
    ("SELECT file('/etc/passwd')", "function file"),
    ("INSERT INTO FUNCTION file('x.csv') SELECT 1", "only SELECT"),
    ("SELECT * FROM url('http://127.0.0.1:1/', CSV)", "table function url"),
    ("SELECT * FROM (SELECT * FROM s3('http://127.0.0.1:1/b/k'))", "table function s3"),
    ("SELECT x FROM enricher.m WHERE x IN (SELECT y FROM remote('h', db.t))", "table function remote"),
    ("SELECT * FROM cluster('c', system.one)", "table function"),
    ("SELECT * FROM mysql('h:3306', 'db', 't', 'u', 'p')", "table function"),
    ("SELECT * FROM jdbc('x', 'y')", "table function"),
    ("SELECT * FROM executable('cat /etc/passwd', CSV, 'x String')", "table function executable"),
    ("SELECT * FROM Python(df)", "table function Python"),
    ("SELECT * FROM input('x String')", "table function input"),
    ("SELECT * FROM merge('enricher', '.*')", "table function merge"),
    ("SELECT * FROM numbers(10)", "table function numbers"),
    ("SELECT * FROM generateRandom('a Int8')", "table function"),
    ("SELECT * FROM dictionary('d')", "dictionary"),
    ("SELECT * FROM view(SELECT * FROM file('/etc/passwd'))", "table function"),
    ("SELECT dictGet('d', 'x', 1)", "function dictGet"),
    ("SELECT joinGet('j', 'v', 1)", "function joinGet"),
    ("SELECT catboostEvaluate('/tmp/m.bin', 1)", "function catboostEvaluate"),
    ("SELECT getSetting('readonly')", "function getSetting"),
    ("SELECT hostName()", "function hostName"),
    ("SELECT currentUser()", "function currentUser"),
    ("SELECT filesystemAvailable()", "function filesystemAvailable"),
    ("SELECT sleepEachRow(3) FROM enricher.m", "function sleepEachRow"),
    ("SELECT arrayMap(x -> file('/etc/passwd'), [1])", "function file"),
    ("WITH file('/etc/passwd') AS x SELECT x", "function file"),
    ("SELECT * FROM system.users", "database 'system'"),
    ("SELECT * FROM enricher.m WHERE f0 > (SELECT count() FROM system.tables)", "database 'system'"),
    ("SELECT * FROM default.t", "database 'default'"),
    ("SELECT 1 SETTINGS max_execution_time=1000", "SETTINGS"),
    ("SELECT * FROM enricher.m SETTINGS readonly=0", "SETTINGS"),
    ("SELECT 1 FORMAT JSON", "FORMAT"),
    ("SELECT * FROM enricher.m INTO OUTFILE 'x'", "INTO OUTFILE"),
    ("SELECT 1; SELECT 2", "exactly one"),
    ("SELECT * FROM enricher.m; DROP TABLE enricher.m", "exactly one"),
    ("CREATE TABLE enricher.x (a Int8) ENGINE=Memory", "only SELECT"),
    ("DROP TABLE enricher.m", "only SELECT"),
    ("ALTER TABLE enricher_store.enriched DELETE WHERE 1", "only SELECT"),
    ("SET readonly = 0", "only SELECT"),
    ("OPTIMIZE TABLE enricher_store.enriched FINAL", "only SELECT"),
    ("SYSTEM SHUTDOWN", "only SELECT"),
    ("KILL QUERY WHERE 1", "only SELECT"),
    ("SHOW TABLES FROM enricher", "only SELECT"),
    ("", "give one SELECT"),
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The guard asks the engine's own parser: a real chDB store (nothing in it is read)."""
    import clickhouse_connect

    client = clickhouse_connect.get_client(interface="chdb", path=str(tmp_path_factory.mktemp("guard-store")))
    yield client
    client.close()


@pytest.mark.parametrize("sql", ALLOWED)
def test_reads_of_the_enriched_tables_pass_the_guard(engine, sql):
    plan = Guard("enricher", 100).plan(engine, sql)
    # what runs is the engine's canonical form of the statement, under an outer limit (DESCRIBE as it is)
    canonical = engine.query("SELECT formatQuerySingleLine({q:String})", parameters={"q": sql}).result_rows[0][0]
    assert plan.sql in (canonical, f"SELECT * FROM ({canonical}) LIMIT 101")


@pytest.mark.parametrize("sql, why", FORBIDDEN, ids=[s[:40] for s, _ in FORBIDDEN])
def test_every_forbidden_kind_is_refused_saying_why(engine, sql, why):
    with pytest.raises(QueryRefused, match=None) as refused:
        Guard("enricher", 100).plan(engine, sql)
    assert why in str(refused.value)


def call(url, path, method="GET", body=None, token=None, context=None):
    request = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as resp:
            return resp.status, json.loads(resp.read() or b"null") if "json" in resp.headers.get(
                "Content-Type", "") else resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"null")
        except ValueError:
            return exc.code, body


def self_signed(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_the_running_worker_serves_only_its_endpoints_behind_the_token_over_https(make_settings, tmp_path):
    cert, key = self_signed(tmp_path)
    settings = make_settings(api_token=TOKEN, http_tls_cert=str(cert), http_tls_key=str(key), query_max_rows=50,
                             query_max_seconds=1.0)
    register_sample(settings, tmp_path)
    produce(settings, sample.inferences(300)[0], batch="json")
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log",
                           extra_env={"ENRICHER_API_TOKEN": TOKEN}).start()
    context = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{settings.http_port}"
    try:
        import time

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status, doc = call(url, "/status", token=TOKEN, context=context)
                if doc["enriched"] >= 300:
                    break
            except (OSError, TypeError):
                pass
            time.sleep(0.5)
        # open: metrics and health; everything else needs the token
        assert call(url, "/health", context=context)[0] == 200
        assert call(url, "/metrics", context=context)[0] == 200
        for path, method, body in [("/status", "GET", None), ("/models", "GET", None),
                                   (f"/models/{sample.MODEL_ID}", "GET", None),
                                   (f"/models/{sample.MODEL_ID}/enrichments", "GET", None),
                                   ("/query", "POST", {"sql": "SELECT 1"})]:
            assert call(url, path, method, body, context=context)[0] == 401, path
            assert call(url, path, method, body, token="wrong", context=context)[0] == 401, path
            assert call(url, path, method, body, token=TOKEN, context=context)[0] == 200, path
        # Faust's own pages are not served (its index at / says {"status": "OK"} and nothing more)
        for path in ("/router/", "/table/", "/stats/", "/graph/", "/performance/"):
            assert call(url, path, token=TOKEN, context=context)[0] == 404, path
        assert call(url, "/", context=context) == (200, {"status": "OK"})
        with pytest.raises(OSError):  # plain HTTP is not spoken
            urllib.request.urlopen(f"http://127.0.0.1:{settings.http_port}/health", timeout=5)

        # The statements that used to get through: refused, and not run.
        written = tmp_path / "written-by-a-query.csv"
        for sql in ["SELECT * FROM file('/etc/passwd', 'CSV')",
                    f"INSERT INTO FUNCTION file('{written}', 'CSV') SELECT 1",
                    "SELECT * FROM url('http://127.0.0.1:1/x', CSV, 'a String')",
                    f"SELECT file('{cert}')"]:
            status, doc = call(url, "/query", "POST", {"sql": sql}, token=TOKEN, context=context)
            assert status == 400 and doc["error"].startswith("query refused:"), sql
        assert not written.exists()
        # Allowed queries still work; the limits hold.
        status, doc = call(url, "/query", "POST", {"sql": f"SELECT count() FROM enricher.{sample.MODEL_ID}"},
                           token=TOKEN, context=context)
        assert (status, doc["rows"]) == (200, [[300]])
        status, doc = call(url, "/query", "POST", {"sql": f"SELECT inference_id FROM enricher.{sample.MODEL_ID}"},
                           token=TOKEN, context=context)
        # more rows than ENRICHER_QUERY_MAX_ROWS: cut there, and the answer says so
        assert (status, len(doc["rows"]), doc["truncated"], doc["row_limit"]) == (200, 50, True, 50)
        heavy = (f"SELECT count() FROM enricher.{sample.MODEL_ID} AS a, enricher.{sample.MODEL_ID} AS b, "
                 f"enricher.{sample.MODEL_ID} AS c, enricher.{sample.MODEL_ID} AS d WHERE a.f0 + b.f1 > c.f2 + d.f3")
        status, doc = call(url, "/query", "POST", {"sql": heavy}, token=TOKEN, context=context)
        assert status == 400 and "TIMEOUT_EXCEEDED" in doc["error"].upper().replace(" ", "_")
    finally:
        worker.stop()
    assert TOKEN not in (tmp_path / "worker.log").read_text()


def test_a_worker_off_loopback_without_a_token_refuses_to_start(make_settings):
    settings = make_settings(http_host="0.0.0.0")
    env = {**os.environ, **settings.to_env()}
    env.pop("ENRICHER_API_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "enricher.cli", "worker"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "ENRICHER_API_TOKEN" in done.stderr and "ENRICHER_HTTP_INSECURE" in done.stderr


def test_enricher_query_without_a_worker_applies_the_same_rules(settings, tmp_path):
    register_sample(settings, tmp_path, trained=False)
    env = {**os.environ, **settings.to_env()}
    done = subprocess.run([sys.executable, "-m", "enricher.cli", "query", "SELECT * FROM file('/etc/passwd')"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "query refused: table function file" in done.stderr
