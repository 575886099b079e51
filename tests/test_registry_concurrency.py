"""The registry under concurrent writes: threads and processes at once, no
toggle lost, no change uncounted, no file half-written."""

from __future__ import annotations

import json
import multiprocessing
import threading

import pyarrow.parquet as pq
from enricher.models.artifact import ArtifactStore
from enricher.models.registry import ModelRegistry

from enricher import sample
from enricher.control.plane import ControlPlane

ROUNDS = 40


def _touch_many(root: str, n: int) -> None:
    registry = ModelRegistry(root)
    for _ in range(n):
        registry.touch()


def _patch_many(root: str, artifacts: str, body_kind: str) -> None:
    control = ControlPlane(ModelRegistry(root), ArtifactStore(artifacts))
    for i in range(ROUNDS):
        if body_kind == "enabled":  # flips, ending on: True
            body = {"anomaly_detection": {"enabled": i % 2 == 1}}
        else:  # config changes, ending on n_estimators = 10 + ROUNDS - 1
            body = {"anomaly_detection": {"config": {"n_estimators": 10 + i}}}
        control.patch_enrichments(sample.MODEL_ID, body)


def registered(tmp_path) -> ModelRegistry:
    reference = tmp_path / "reference.parquet"
    pq.write_table(sample.reference_table(200), reference)
    registry = ModelRegistry(tmp_path / "registry")
    registry.register(sample.MODEL_ID, sample.SCHEMA, reference)
    return registry


def test_every_change_from_threads_and_processes_is_counted(tmp_path):
    registry = registered(tmp_path)
    start = registry.generation()
    spawn = multiprocessing.get_context("spawn")
    processes = [spawn.Process(target=_touch_many, args=(str(registry.state.root), 100)) for _ in range(2)]
    threads = [threading.Thread(target=_touch_many, args=(str(registry.state.root), 100)) for _ in range(4)]
    errors = []

    def guarded(t):
        try:
            t()
        except Exception as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(exc)

    for p in processes:
        p.start()
    threads = [threading.Thread(target=guarded, args=(t.run,)) for t in threads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in processes:
        p.join(120)
        assert p.exitcode == 0
    assert not errors, errors[0]
    assert registry.generation() - start == 600


def test_two_patches_at_once_from_two_processes_lose_no_toggle(tmp_path):
    registry = registered(tmp_path)
    spawn = multiprocessing.get_context("spawn")
    writers = [spawn.Process(target=_patch_many, args=(str(registry.state.root), str(tmp_path / "artifacts"), kind))
               for kind in ("enabled", "config")]
    for p in writers:
        p.start()
    seen = 0
    while any(p.is_alive() for p in writers):  # readers meanwhile never see a half-written file
        json.loads((registry.state.root / sample.MODEL_ID / "enrichments.json").read_text())
        registry.status(sample.MODEL_ID, "anomaly_detection")
        seen += 1
    for p in writers:
        p.join(120)
        assert p.exitcode == 0
    toggle = registry.enrichments(sample.MODEL_ID)["anomaly_detection"]
    assert toggle == {"enabled": True, "config": {"n_estimators": 10 + ROUNDS - 1}}, \
        "each PATCH changed only what it named, on the state the other left"
    assert seen > 0
    assert not [p for p in registry.state.root.rglob(".*") if p.name != ".lock"], "no temporary file left behind"


def test_patches_from_threads_of_one_process_lose_no_toggle(tmp_path):
    registry = registered(tmp_path)
    threads = [threading.Thread(target=_patch_many, args=(str(registry.state.root), str(tmp_path / "a"), kind))
               for kind in ("enabled", "config", "enabled", "config")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    toggle = registry.enrichments(sample.MODEL_ID)["anomaly_detection"]
    assert toggle == {"enabled": True, "config": {"n_estimators": 10 + ROUNDS - 1}}
