"""Prometheus metrics of the worker, served at /metrics on its HTTP port."""

from __future__ import annotations

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

CONSUMED = Counter("enricher_inferences_consumed", "Inferences (rows) taken from the inference topic, stored "
                   "or dead-lettered; a batched message counts its rows (model is empty when a row named no "
                   "registered model)", ["model"])
ENRICHED = Counter("enricher_inferences_enriched", "Inferences (rows) enriched and written to ClickHouse", ["model"])
DEAD_LETTERED = Counter("enricher_inferences_dead_lettered", "Inferences (rows) sent to the dead-letter topic, "
                        "or whole messages where no row could be read (model is empty for unregistered ids)",
                        ["model", "reason"])
BATCH_ROWS = Histogram("enricher_batch_rows", "Inferences (rows) per processed batch",
                       buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000))
BATCH_MESSAGES = Histogram("enricher_batch_messages", "Kafka messages per processed batch",
                           buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000, 50000))
INTERNAL_ERRORS = Counter("enricher_internal_errors", "Batches that failed on a bug (bisected; the message "
                          "that triggers it is dead-lettered as internal_error)")
DEAD_LETTERS_TRUNCATED = Counter("enricher_dead_letters_truncated", "Dead letters whose value was cut to "
                                 "ENRICHER_DLQ_MAX_BYTES (full length and sha256 in headers)")
STORE_RETRIES = Counter("enricher_store_retries", "Writes retried because the store could not take them "
                        "(connection, timeout, 5xx, too many parts); consumption pauses meanwhile")
ENRICHMENT_SECONDS = Histogram("enricher_enrichment_seconds", "Time spent in one enrichment's transform per batch",
                               ["enrichment"], buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
ENRICHMENT_NULLS = Counter("enricher_enrichment_null_rows", "Rows an enrichment served but left NULL on "
                           "purpose: bias mitigation for a group not seen in training or no sensitive value; "
                           "explanations for a row the sample rate skipped", ["model", "enrichment"])
ENRICHMENT_ERRORS = Counter("enricher_enrichment_errors", "Batches an enrichment failed on (columns left NULL)",
                            ["model", "enrichment"])
INSERT_SECONDS = Histogram("enricher_clickhouse_insert_seconds", "Duration of one ClickHouse insert",
                           buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
INSERT_ROWS = Counter("enricher_clickhouse_rows_inserted", "Rows written to ClickHouse", ["model"])
INSERT_FAILURES = Counter("enricher_clickhouse_insert_failures", "Failed inserts (the batch is retried)")
E2E_LATENCY = Histogram("enricher_end_to_end_latency_seconds",
                        "From an inference's timestamp to the insert of its enriched row",
                        buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 3600))
REBALANCES = Histogram("enricher_rebalance_seconds", "Consumer group rebalances this worker went through, "
                       "and how long its stream was suspended by each",
                       buckets=(.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
LABELS_RECEIVED = Counter("enricher_labels_received", "Label updates taken from the inference topic and stored "
                          "in the labels table", ["model"])
LABELS_APPLIED = Counter("enricher_labels_applied", "Labels the sweep brought to their inference's row")
LABELS_PENDING = Counter("enricher_labels_pending", "Label updates that found no inference yet (kept for "
                         "ENRICHER_LABEL_PENDING_DAYS)")
LABEL_SWEEP_SECONDS = Histogram("enricher_label_sweep_seconds", "Duration of one label sweep",
                                buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
LABEL_SWEEP_FAILURES = Counter("enricher_label_sweep_failures", "Label sweeps that failed (the next one "
                               "covers their window again)")
DRIFT = Gauge("enricher_drift", "Drift of the last ENRICHER_DRIFT_WINDOW of a model's inferences against its "
              "reference data, per feature: metric is psi, kl, js, hellinger, ks or ks_pvalue (README: Drift)",
              ["model", "feature", "metric"])
DRIFT_SIGNIFICANT = Gauge("enricher_drift_significant", "1 when the drift window held at least "
                          "ENRICHER_DRIFT_MIN_ROWS values of the feature, else 0 (its figures are noise-prone)",
                          ["model", "feature"])
DRIFT_ROWS = Gauge("enricher_drift_rows", "Rows of the feature in the drift window (0: the metrics are absent)",
                   ["model", "feature"])
PERFORMANCE = Gauge("enricher_performance", "A model's performance over the last day of inferences whose label "
                    "has arrived (README: Performance): metric is the task's (accuracy, precision, recall, f1, "
                    "roc_auc; accuracy, macro_f1; mae, rmse, r2), label_coverage or labelled", ["model", "metric"])
FAIRNESS_GAP = Gauge("enricher_fairness_gap", "The largest difference between groups of a sensitive attribute "
                     "over the last day (README: Fairness): constraint demographic_parity, equal_opportunity or "
                     "equalized_odds; decision raw or mitigated", ["model", "attribute", "constraint", "decision"])
ARTIFACT_LOADS = Counter("enricher_artifact_loads", "Artifact versions loaded or refused",
                         ["model", "enrichment", "result"])
ARTIFACT_VERSION = Gauge("enricher_artifact_version", "The artifact version serving each enabled enrichment of each "
                         "model this worker has loaded (absent: not loaded, not trained yet, or turned off)",
                         ["model", "enrichment"])
CONSUMER_LAG = Gauge("enricher_consumer_lag", "Messages of a partition this worker holds that are not enriched yet: "
                     "the high watermark of the latest fetch response minus the next offset to process (a "
                     "partition appears once the worker knows where it resumes: a batch processed, or the group's committed offset)",
                     ["topic", "partition"])
CONSUMER_HIGHWATER = Gauge("enricher_consumer_highwater", "High watermark of a partition this worker holds, from "
                           "the latest fetch response (the offset the next produced message will get)",
                           ["topic", "partition"])

# The trigger's own (served on ENRICHER_TRIGGER_METRICS_PORT): training runs it submitted and followed.
TRAINING_SUBMITTED = Counter("enricher_training_runs_submitted", "Training workflow runs the trigger submitted",
                             ["model"])
TRAINING_RUNS = Counter("enricher_training_runs", "Training workflow runs followed to their end: result is "
                        "succeeded, failed (a step failed) or error (the runner could not run it); a run "
                        "stopped because a newer one superseded it is counted as stopped", ["model", "result"])
TRAINING_SECONDS = Histogram("enricher_training_run_seconds", "From submission to the end of a training run",
                             ["result"], buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200))
TRAINING_RUNNING = Gauge("enricher_training_runs_running", "Training runs submitted and not ended yet")
SUBMIT_FAILURES = Counter("enricher_training_submit_failures", "Runs the runner refused to take (Argo Server "
                          "unreachable or refusing the workflow)", ["model"])


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """Observe a whole array at once: one bucket count per bucket, not one call per row.

    prometheus-client has no bulk observe; this adds the counts to the same
    bucket and sum values `observe()` would update (tests check the totals).
    """
    if values.size == 0:
        return
    bounds = np.asarray(histogram._upper_bounds)
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for i, c in enumerate(counts[: len(bounds)]):
        if c:
            histogram._buckets[i].inc(int(c))
    histogram._sum.inc(float(values.sum()))
