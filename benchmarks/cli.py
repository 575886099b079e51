"""The CLI's start-up section of `make bench`: how long a simple command takes, end to end.

    python benchmarks/cli.py [--repeat 5] [--smoke]

Each command runs as a user types it (`enricher ...`, a fresh process, the
embedded store) against a data directory holding the sample model, registered,
with anomaly detection trained and its tables created. Reports the median and
the slowest of `--repeat` runs per command; the target is a simple command
(`models list`, `enrichments show`, `query`) under 1.5 s. The time is the
process's whole life: interpreter start, imports, the work, exit.

Writes benchmarks/results/cli.{json,md} (cli-smoke with --smoke); `make bench`
runs it as its "cli" step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
TARGET_SECONDS = 1.5
MODEL = "credit_default"
COMMANDS = [
    ["--help"],
    ["models", "list"],
    ["models", "show", MODEL],
    ["enrichments", "show", MODEL],
    ["artifacts", "list", MODEL],
    ["query", f"SELECT count() FROM enricher.{MODEL}"],
]
SIMPLE = {"models list", f"enrichments show {MODEL}", f"query SELECT count() FROM enricher.{MODEL}"}


def prepare(data_dir: Path) -> dict[str, str]:
    """A data directory as a user has it after the quick start, and the environment to reach it."""
    import pyarrow.parquet as pq
    from enricher.pipelines.train import train

    from enricher import sample
    from enricher.config import Settings
    from enricher.control.registry import open_registry
    from enricher.store.clickhouse import EnrichedTables, connect

    settings = Settings.from_env(env={}, data_dir=str(data_dir), broker="kafka://127.0.0.1:1")
    reference = data_dir.parent / "reference.parquet"
    pq.write_table(sample.reference_table(2000), reference)
    registry = open_registry(settings)
    registry.register(MODEL, sample.SCHEMA, reference)
    registry.set_enrichment(MODEL, "anomaly_detection", True, {"n_estimators": 50})
    train(registry, settings.artifacts(), MODEL, log=lambda _: None)
    client = connect(settings)
    tables = EnrichedTables.from_settings(client, settings)
    tables.ensure_table()
    tables.ensure_view(registry.get(MODEL))
    client.close()
    return settings.to_env()


def time_command(argv: list[str], env: dict, repeat: int) -> dict:
    enricher = Path(sys.executable).with_name("enricher")
    command = [str(enricher)] if enricher.exists() else [sys.executable, "-m", "enricher.cli"]
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        done = subprocess.run(command + argv, env=env, capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"enricher {' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return {"median_s": round(statistics.median(seconds), 3), "max_s": round(max(seconds), 3), "runs": repeat}


def run(repeat: int = 5) -> dict:
    with tempfile.TemporaryDirectory(prefix="enricher-cli-bench-") as tmp:
        env = {**os.environ, **prepare(Path(tmp) / "data")}
        out = {}
        for argv in COMMANDS:
            key = " ".join(argv)
            out[key] = time_command(argv, env, repeat)
            print(f"   enricher {key}: median {out[key]['median_s']:.2f} s, slowest {out[key]['max_s']:.2f} s",
                  flush=True)
    simple = [out[k]["median_s"] for k in SIMPLE]
    return {"commands": out, "target_s": TARGET_SECONDS, "simple_slowest_median_s": max(simple),
            "met": max(simple) < TARGET_SECONDS}


def write(results: dict, smoke: bool = False) -> None:
    name = "cli-smoke" if smoke else "cli"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    lines = [f"CLI start-up, a fresh process per call ({os.cpu_count()} cores; median and slowest of "
             f"{next(iter(results['commands'].values()))['runs']} runs; target: a simple command under "
             f"{results['target_s']} s):", "", "| command | median s | slowest s |", "| --- | ---: | ---: |"]
    for key, r in results["commands"].items():
        mark = " (simple)" if key in SIMPLE else ""
        lines.append(f"| `enricher {key}`{mark} | {r['median_s']:.2f} | {r['max_s']:.2f} |")
    lines += ["", f"Slowest simple command: {results['simple_slowest_median_s']:.2f} s "
                  f"({'met' if results['met'] else 'NOT met'})."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="three runs per command (CI)")
    args = parser.parse_args()
    results = run(3 if args.smoke else args.repeat)
    write(results, args.smoke)
    print((RESULTS / f"cli{'-smoke' if args.smoke else ''}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
