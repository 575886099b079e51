"""A real Prometheus (Debian's) scrapes a real worker: the PromQL a dashboard uses answers."""

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from enricher import sample
from enricher.broker import free_port
from enricher.supervise import WorkerProcess

from .conftest import register_sample
from .test_stream import produce

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def prometheus(tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: `make test` installs Debian's package (apt-get install prometheus)")
    procs = []

    def start(target: str) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n"
                          f"scrape_configs:\n  - job_name: enricher\n    static_configs:\n"
                          f"      - targets: ['{target}']\n")
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


def test_prometheus_scrapes_the_worker_and_answers_dashboard_queries(make_settings, tmp_path, prometheus):
    settings = make_settings(drift_interval=1.0)
    register_sample(settings, tmp_path)
    bad = sample.malformed(max_bytes=settings.max_message_bytes)
    produce(settings, sample.inferences(4000)[0] + [m for m, _ in bad])
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
    try:
        worker.wait_for(lambda s: s["consumed"] >= 4000 + len(bad), timeout=120)
        base = prometheus(f"127.0.0.1:{settings.http_port}")
        deadline = time.monotonic() + 60
        enriched = []
        while time.monotonic() < deadline:
            enriched = promql(base, 'sum(enricher_inferences_enriched_total{model="credit_default"})')
            if enriched and float(enriched[0]["value"][1]) == 4000:
                break
            time.sleep(0.5)
        assert enriched and float(enriched[0]["value"][1]) == 4000
        dead = promql(base, "sum by (reason) (enricher_inferences_dead_lettered_total)")
        assert {r["metric"]["reason"]: float(r["value"][1]) for r in dead} == {reason: 1.0 for _, reason in bad}
        p99 = promql(base, "histogram_quantile(0.99, sum by (le) (enricher_end_to_end_latency_seconds_bucket))")
        assert p99 and 0 < float(p99[0]["value"][1]) < 3600
        # drift gauges, one series per feature and metric (a dashboard's "drift per feature" panel)
        deadline = time.monotonic() + 60
        psi = []
        while time.monotonic() < deadline and len(psi) < 12:
            psi = promql(base, 'enricher_drift{model="credit_default", metric="psi"}')
            time.sleep(0.5)
        assert sorted(r["metric"]["feature"] for r in psi) == sorted(sample.NUMERIC + ["region", "sex"])
        assert all(float(r["value"][1]) >= 0 for r in psi)
        up = promql(base, 'up{job="enricher"}')
        assert float(up[0]["value"][1]) == 1
    finally:
        worker.stop()
