"""Onboarding many models: `enricher train --all` on N registered models (the onboarding section
of `make bench`, issue 20's target: 1,000 models with anomaly detection on 5,000 reference rows
each, fitted and published in under 10 minutes on our 2 cores).

    python benchmarks/onboarding.py [--models 1000] [--rows 5000] [--jobs N] [--smoke]

Registers the models in a fresh data directory (each its own reference file: the sample data
drawn with its own seed), then runs `enricher train --all` as a user types it (a fresh process)
and times it end to end. Writes benchmarks/results/onboarding.{json,md} (onboarding-smoke with --smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
TARGET_SECONDS = 600  # 1,000 models


def register(data_dir: Path, models: int, rows: int) -> float:
    import pyarrow.parquet as pq

    from enricher import sample
    from enricher.config import Settings
    from enricher.control.registry import open_registry

    settings = Settings.from_env(env={}, data_dir=str(data_dir), broker="kafka://127.0.0.1:1")
    registry = open_registry(settings)
    started = time.perf_counter()
    for i in range(models):
        reference = data_dir.parent / f"reference-{i}.parquet"
        pq.write_table(sample.reference_table(rows, seed=1000 + i), reference)
        model_id = f"model_{i:05d}"
        registry.register(model_id, sample.SCHEMA, reference)
        registry.set_enrichment(model_id, "anomaly_detection", True)
        reference.unlink()
    return time.perf_counter() - started


def run(models: int, rows: int, jobs: int | None = None) -> dict:
    """Register `models` models, then time `enricher train --all` in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="onboarding-") as tmp:
        data_dir = Path(tmp) / "data"
        registering = register(data_dir, models, rows)
        print(f"registered {models:,} models of {rows:,} reference rows in {registering:.1f} s", flush=True)
        command = [str(Path(sys.executable).parent / "enricher"), "--data-dir", str(data_dir), "train", "--all"]
        if jobs:
            command += ["--jobs", str(jobs)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"enricher train --all failed: {done.stdout[-1000:]} {done.stderr[-3000:]}")
    per_model = seconds / models
    return {"models": models, "rows": rows, "jobs": jobs or os.cpu_count(), "cpus": os.cpu_count(),
            "register_seconds": round(registering, 1), "train_all_seconds": round(seconds, 1),
            "seconds_per_model": round(per_model, 3), "for_1000_models_seconds": round(per_model * 1000, 1),
            "target_seconds": TARGET_SECONDS, "met": per_model * 1000 <= TARGET_SECONDS,
            "summary": done.stdout.strip(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(r: dict) -> list[str]:
    return ["| models | reference rows each | processes | train --all | per model | 1,000 models | target |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            f"| {r['models']:,} | {r['rows']:,} | {r['jobs']} | {r['train_all_seconds']:.1f} s | "
            f"{r['seconds_per_model']:.3f} s | {r['for_1000_models_seconds']:.0f} s | {r['target_seconds']} s "
            f"({'met' if r['met'] else 'not met'}) |", "",
            f"Registering them took {r['register_seconds']:.1f} s (not counted). `{r['summary']}`"]


def write(r: dict, smoke: bool) -> None:
    name = "onboarding-smoke" if smoke else "onboarding"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(r, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(f"# Onboarding: `enricher train --all` ({r['when']})\n\n"
                                        + "\n".join(markdown(r)) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--jobs", type=int, default=None, help="enricher train --jobs (default: the CPU count)")
    parser.add_argument("--smoke", action="store_true", help="20 models of 1,000 rows: keeps the script from rotting")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.rows = 20, 1000
    r = run(args.models, args.rows, args.jobs)
    write(r, args.smoke)
    print(r["summary"])
    print(f"train --all: {r['train_all_seconds']:.1f} s for {r['models']:,} models ({r['seconds_per_model']:.3f} s "
          f"each; 1,000 models: {r['for_1000_models_seconds']:.0f} s, target {TARGET_SECONDS} s: "
          f"{'met' if r['met'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
