"""Hostile messages: each kind on its own through the parser, then the whole
corpus mid-stream through a real worker (Tansu -> Faust -> chDB)."""

from __future__ import annotations

from collections import Counter

import pytest
from enricher.models.spec import ModelSpec

from enricher import sample
from enricher.stream.contract import REASONS, parse_batch

from .hostile import corpus

SPEC = ModelSpec.from_json(sample.MODEL_ID, sample.SCHEMA)
MAX = 65_536
KINDS = corpus(MAX)


def test_the_corpus_has_at_least_sixty_kinds():
    assert len({h.kind for h in KINDS}) == len(KINDS) >= 60


@pytest.mark.parametrize("hostile", KINDS, ids=[h.kind for h in KINDS])
def test_each_hostile_kind_is_stored_or_dead_lettered_as_it_must_be(hostile):
    batch = parse_batch([hostile.value], [3], [41], {sample.MODEL_ID: SPEC}.get, MAX, [hostile.content_type])
    stored = {i for rows in batch.models.values() for i in rows.inference_id.to_pylist()}
    assert stored == hostile.stored
    assert Counter(d.reason for d in batch.dead) == hostile.reasons
    for d in batch.dead:
        assert d.reason in REASONS and d.detail and len(d.detail) <= 400
        assert (d.partition, d.offset) == (3, 41)
        assert d.raw or hostile.value == b"", "a dead letter carries the bytes to look at and replay"


def test_the_whole_corpus_mid_stream_crashes_nothing_and_every_message_is_accounted_for(make_settings, tmp_path):
    import signal

    from enricher.stream import deadletters
    from enricher.stream.producer import InferenceProducer
    from enricher.stream.topics import ensure_topics
    from enricher.supervise import WorkerProcess

    from .conftest import register_sample
    from .test_stream import count_rows, query

    max_bytes = 256 * 1024
    # a dead letter cap below the message limit: the too-large messages are cut, and still accounted for
    settings = make_settings(max_message_bytes=max_bytes, dlq_max_bytes=64 * 1024, batch_size=500)
    register_sample(settings, tmp_path)
    kinds = corpus(max_bytes)
    stored, reasons = (set().union(*(h.stored for h in kinds)),
                       sum((h.reasons for h in kinds), Counter()))
    valid, _ = sample.inferences(6000)
    ensure_topics(settings)
    producer = InferenceProducer(settings, batch="json", batch_rows=200)
    step = len(valid) // len(kinds)
    for k, hostile in enumerate(kinds):  # each hostile message between runs of valid ones
        producer.send_many(valid[k * step:(k + 1) * step])
        producer.send_alone(hostile.value, hostile.content_type)
    producer.send_many(valid[len(kinds) * step:])
    producer.flush()

    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
    try:
        total = len(valid) + len(stored) + sum(reasons.values())
        status = worker.wait_for(lambda s: s["enriched"] + s["dead_lettered"] >= total, timeout=180)
        assert (status["enriched"], status["dead_lettered"]) == (len(valid) + len(stored), sum(reasons.values()))
        metrics = worker.metrics()
        assert "enricher_internal_errors_total 0.0" in metrics
        assert "enricher_enrichment_errors_total{" not in metrics, "no enrichment failed on a hostile batch"
        assert worker.process.poll() is None
        assert worker.stop(signal.SIGTERM, timeout=40) == 0, "a clean stop after all that"
    finally:
        worker.stop(signal.SIGKILL, timeout=5)
    log = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in log and "crashed" not in log.lower(), "no agent crash, no traceback"

    assert count_rows(settings) == (len(valid) + len(stored),) * 2
    # nothing was redelivered here, so storage itself holds each row once (not only the view)
    _, in_storage = query(settings, "SELECT count() FROM enricher_store.enriched")
    assert in_storage[0][0] == len(valid) + len(stored)
    _, rows = query(settings, f"SELECT inference_id FROM enricher.{sample.MODEL_ID} "
                              f"WHERE NOT startsWith(inference_id, 'inf-')")
    assert {r[0] for r in rows} == stored, "the hostile rows that are valid are stored exactly as sent"
    records = deadletters.read(settings, expected=sum(reasons.values()))
    assert Counter(r.reason for r in records) == reasons
    cut = [r for r in records if r.original_bytes is not None]
    assert cut and all(len(r.value) == 64 * 1024 < r.original_bytes for r in cut)
    originals = {h.value for h in kinds}
    import hashlib
    assert all(any(hashlib.sha256(v).hexdigest() == r.original_sha256 for v in originals) for r in cut)
