"""A real Prometheus (Debian's) scrapes a real worker: the PromQL a dashboard uses answers."""

import dataclasses
import time

import pytest

from enricher import sample
from enricher.supervise import WorkerProcess

from .conftest import promql, register_sample
from .test_stream import produce

pytestmark = pytest.mark.timeout(240)


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
        # lag per partition from the fetch responses' high watermark: every message was produced
        # (the high watermarks add up to them) and enriched (no lag left)
        deadline = time.monotonic() + 30
        high = []
        while time.monotonic() < deadline and not (high and float(high[0]["value"][1]) == 4000 + len(bad)):
            high = promql(base, "sum(enricher_consumer_highwater)")
            time.sleep(0.5)
        assert float(high[0]["value"][1]) == 4000 + len(bad)
        lag = promql(base, "enricher_consumer_lag")
        assert len(lag) == settings.topic_partitions and all(float(r["value"][1]) == 0 for r in lag)
        version = promql(base, 'enricher_artifact_version{model="credit_default", enrichment="anomaly_detection"}')
        assert [float(r["value"][1]) for r in version] == [1.0]
        up = promql(base, 'up{job="enricher"}')
        assert float(up[0]["value"][1]) == 1
    finally:
        worker.stop()


def test_a_worker_stuck_from_its_start_shows_its_lag(make_settings, tmp_path):
    """The store is down from the moment a worker starts: no batch is ever processed, and the
    lag per partition still shows what waits (from the group's committed offset to the high
    watermark), which is what the EnricherLagGrowing alert watches."""
    import re

    settings = make_settings()
    register_sample(settings, tmp_path)
    produce(settings, sample.inferences(1000, id_prefix="before")[0])
    first = WorkerProcess(settings, log_path=tmp_path / "first.log").start()
    try:
        first.wait_for(lambda s: s["consumed"] >= 1000, timeout=120)
    finally:
        first.stop()  # commits what it wrote
    produce(settings, sample.inferences(700, id_prefix="after")[0])
    down = dataclasses.replace(settings, clickhouse_url="http://127.0.0.1:1/enricher")
    stuck = WorkerProcess(down, log_path=tmp_path / "stuck.log").start()
    try:
        deadline = time.monotonic() + 90
        lag = {}
        while time.monotonic() < deadline:
            try:
                text = stuck.metrics()
            except OSError:  # not serving yet
                text = ""
            lag = {m.group(1): float(m.group(2)) for m in
                   re.finditer(r'^enricher_consumer_lag\{partition="(\d+)",topic="[^"]+"\} (\S+)$', text, re.M)}
            if len(lag) == settings.topic_partitions and sum(lag.values()) == 700:
                break
            time.sleep(0.5)
        assert len(lag) == settings.topic_partitions and sum(lag.values()) == 700, lag
        assert stuck.status()["enriched"] == 0
    finally:
        stuck.stop()
