"""SIGTERM in every state, and a store that hangs instead of failing: each
fault for real (a real broker, a real engine behind a proxy that stops
answering), nothing lost, nothing committed that was not written."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from enricher import sample
from enricher.broker import free_port
from enricher.supervise import TriggerProcess, WorkerProcess

from .clickhouse_http import ClickHouseHTTP
from .conftest import register_sample
from .faultproxy import FaultProxy
from .test_stream import committed_offsets, count_rows, produce, query

pytestmark = pytest.mark.timeout(300)


def rss_mb(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def stop_timed(child, sig=signal.SIGTERM, timeout=60.0) -> tuple[int, float]:
    started = time.monotonic()
    code = child.stop(sig, timeout=timeout)
    return code, time.monotonic() - started


@pytest.fixture
def hanging_store(tmp_path):
    server = ClickHouseHTTP(tmp_path / "server").start()
    proxy = FaultProxy(server.port)
    yield server, proxy
    proxy.stop()
    server.stop()


@pytest.mark.slow  # a fault or soak test: `make test-slow` (CI runs it)
def test_a_hanging_store_times_out_is_retried_loses_nothing_and_memory_stays_bounded(make_settings, tmp_path,
                                                                                      hanging_store):
    server, proxy = hanging_store
    settings = make_settings(clickhouse_url=f"http://default:@127.0.0.1:{proxy.port}/enricher",
                             clickhouse_timeout=2.0, max_message_bytes=1 << 20, batch_size=200)
    register_sample(settings, tmp_path)
    produce(settings, sample.inferences(2000, id_prefix="before")[0], batch="json")
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
    try:
        worker.wait_for(lambda s: s["enriched"] >= 2000, timeout=120)
        proxy.hang()
        baseline = rss_mb(worker.process.pid)
        # ~40 MB of inferences arrive while every insert hangs
        produce(settings, sample.inferences(100_000, id_prefix="during", seed=3)[0], batch="json")
        deadline = time.monotonic() + 60
        while "enricher_store_retries_total 0.0" in worker.metrics() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(8)  # several timed-out attempts later
        status = worker.status()
        assert status["enriched"] == 2000, "no batch counts as written while the store hangs"
        grown = rss_mb(worker.process.pid) - baseline
        assert grown < 250, f"the worker held {grown:.0f} MB more while the store hung: fetching must pause"
        proxy.heal()
        worker.wait_for(lambda s: s["enriched"] >= 102_000, timeout=240)
    finally:
        worker.stop()
    assert count_rows(settings) == (102_000, 102_000)
    _, stored = query(settings, f"SELECT count() FROM enricher_store.enriched WHERE model_id = '{sample.MODEL_ID}'")
    assert stored[0][0] >= 102_000


@pytest.mark.slow  # a fault or soak test: `make test-slow` (CI runs it)
def test_sigterm_while_the_store_hangs_stops_within_the_grace_and_commits_nothing_unwritten(
        make_settings, tmp_path, hanging_store):
    server, proxy = hanging_store
    settings = make_settings(clickhouse_url=f"http://default:@127.0.0.1:{proxy.port}/enricher",
                             clickhouse_timeout=60.0, shutdown_grace=5.0, topic_partitions=1)
    register_sample(settings, tmp_path)
    produce(settings, sample.inferences(1000, id_prefix="before")[0])
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
    worker.wait_for(lambda s: s["enriched"] >= 1000, timeout=120)
    deadline = time.monotonic() + 30
    while committed_offsets(settings) != [1000] and time.monotonic() < deadline:
        time.sleep(0.5)
    proxy.hang()
    produce(settings, sample.inferences(500, id_prefix="during")[0])
    time.sleep(3)  # the insert of "during" now waits on a store that never answers (60 s timeout)
    code, took = stop_timed(worker)
    assert took < 5.0 + 10, f"stopped after {took:.1f}s; the grace is 5 s"
    assert code in (0, 1)
    assert "ENRICHER_SHUTDOWN_GRACE" in (tmp_path / "worker.log").read_text() or code == 0
    assert committed_offsets(settings) == [1000], "the hung batch was not committed"
    proxy.heal()
    again = WorkerProcess(settings, log_path=tmp_path / "again.log").start()
    try:
        again.wait_for(lambda s: s["enriched"] >= 500, timeout=120)
    finally:
        again.stop()
    assert count_rows(settings) == (1500, 1500)


@pytest.mark.slow  # a fault or soak test: `make test-slow` (CI runs it)
def test_sigterm_mid_stream_commits_what_was_written_and_a_restart_finishes_the_rest(make_settings, tmp_path):
    settings = make_settings(batch_size=500, batch_timeout=0.05, topic_partitions=2)
    register_sample(settings, tmp_path)
    total = 30_000
    produce(settings, sample.inferences(total)[0])
    first = WorkerProcess(settings, log_path=tmp_path / "first.log").start()
    first.wait_for(lambda s: s["consumed"] >= 5000, timeout=120, interval=0.05)
    code, took = stop_timed(first)
    assert code == 0 and took < settings.shutdown_grace + 10
    committed = committed_offsets(settings)
    # Everything below each committed offset is stored (nothing committed ahead of its rows).
    second = WorkerProcess(settings, log_path=tmp_path / "second.log").start()
    try:
        second.wait_for(lambda s: count_rows(settings)[1] >= total, timeout=180, interval=0.5)
    finally:
        second.stop()
    assert count_rows(settings) == (total, total)
    assert 0 < sum(c for c in committed if c > 0) < total, "the stop landed mid-stream"
    assert "Traceback" not in (tmp_path / "first.log").read_text()


def test_sigterm_while_the_store_is_down_stops_within_the_grace(make_settings, tmp_path):
    server = ClickHouseHTTP(tmp_path / "server").start()
    settings = make_settings(clickhouse_url=server.url(), shutdown_grace=10.0, topic_partitions=1)
    register_sample(settings, tmp_path)
    produce(settings, sample.inferences(500, id_prefix="before")[0])
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
    try:
        worker.wait_for(lambda s: s["enriched"] >= 500, timeout=120)
        server.stop()
        produce(settings, sample.inferences(500, id_prefix="during")[0])
        worker.wait_for(lambda s: "enricher_store_retries_total 0.0" not in worker.metrics(), timeout=60)
        code, took = stop_timed(worker)
        assert code == 0 and took < 10 + 10
        assert committed_offsets(settings) in ([500], [0]) or committed_offsets(settings)[0] <= 500
    finally:
        worker.stop(signal.SIGKILL, timeout=5)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except FileNotFoundError:
        return []


def test_enricher_broker_exits_on_sigterm_and_reaps_its_broker():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "enricher.cli", "broker", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening" in line, line
        child = int(re.search(r"pid (\d+)", line).group(1))
        assert child in _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        with pytest.raises(OSError):  # the broker is gone, not a zombie: its pid no longer exists
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                os.kill(child, 0)
                if open(f"/proc/{child}/stat").read().split()[2] == "Z":
                    raise AssertionError("the broker child is a zombie")
                time.sleep(0.2)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "nothing listens on the broker's port any more"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_enricher_trigger_exits_on_sigterm(make_settings, tmp_path):
    settings = make_settings()
    trigger = TriggerProcess(settings, log_path=tmp_path / "trigger.log").start()
    deadline = time.monotonic() + 60
    while "trigger ready" not in (tmp_path / "trigger.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    code, took = stop_timed(trigger, timeout=30)
    assert code == 0 and took < 20


def test_enricher_demo_on_sigterm_stops_everything_it_started(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "enricher.cli", "--data-dir", str(tmp_path / "demo"), "demo",
                             "--inferences", "5000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("== 4/7"):  # broker, worker and trigger are all running
                break
        children = _children(proc.pid)
        assert len(children) >= 3, "".join(seen)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130
        deadline = time.monotonic() + 15
        alive = children
        while alive and time.monotonic() < deadline:
            alive = [c for c in alive if os.path.exists(f"/proc/{c}") and
                     open(f"/proc/{c}/stat").read().split()[2] != "Z"]
            time.sleep(0.2)
        assert not alive, f"left running: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
