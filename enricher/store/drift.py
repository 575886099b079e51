"""Drift of recent inferences against the reference data, computed in ClickHouse SQL.

The reference profile (models/profile.py: quantile bins and counts per
numeric feature, the most frequent categories per categorical one, and the
numeric reference values) is written to ClickHouse once per reference data
(`<database>_store.reference_bins`, `<database>_store.reference_values`,
keyed by the reference file's digest and the bin count): at registration
through the API (PUT /models/{id}), else by whichever of the worker's drift
export, `GET /models/{id}/drift` or `enricher drift` needs it first. Then, per feature, for the rows of a time window:

- the window's rows are binned like the reference (in SQL, with the edges or
  categories read from reference_bins), and with p the reference's share of
  each bin and q the window's, both smoothed by adding SMOOTHING to every
  bin's count (so that an empty bin gives finite values):
    PSI        sum (q - p) ln(q / p)
    KL         sum q ln(q / p)                  (window against reference)
    JS         (KL(q || m) + KL(p || m)) / 2, m = (p + q) / 2   (natural log)
    Hellinger  sqrt(sum (sqrt q - sqrt p)^2 / 2)
- numeric features also get the two-sample Kolmogorov-Smirnov statistic
  sup |F_reference - F_window|, exact, over the reference values and every
  value of the window (both empirical CDFs evaluated at every distinct value).

Missing values are left out of both sides. A window without a value of the
feature gives NULL metrics (and rows = 0).

Every figure comes with the window's row count, and numeric features with the
KS test's p-value (scipy's asymptotic form: the Kolmogorov-Smirnov
distribution at the effective size `n m / (n + m)`): the chance of a statistic this large if the window were drawn
from the reference. Binned metrics are noisy on few rows (on 111 rows drawn
from the reference itself, PSI reads 0.1-0.2 on 10 bins), so figures from a
window of fewer than `min_rows` values are marked `significant: false`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from enricher import metrics
from enricher.errors import InvalidArgument
from enricher.models.profile import FeatureProfile, profile
from enricher.models.registry import ModelRegistry
from enricher.models.spec import ModelSpec
from enricher.store.clickhouse import (
    REFERENCE_BINS,
    REFERENCE_VALUES,
    EnrichedTables,
    literal,
    quote,
    store_table,
)

log = logging.getLogger(__name__)
SMOOTHING = 0.5
METRICS = ("psi", "kl", "js", "hellinger", "ks", "ks_pvalue")  # the FeatureDrift figures exported as gauges
@dataclass
class FeatureDrift:
    feature: str
    kind: str
    rows: int
    reference_rows: int
    psi: float | None
    kl: float | None
    js: float | None
    hellinger: float | None
    ks: float | None
    ks_pvalue: float | None = None
    significant: bool = False  # the window held at least min_rows values of the feature

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DriftReport:
    model_id: str
    start: float  # epoch seconds
    end: float
    bins: int
    features: list[FeatureDrift]
    min_rows: int = 0

    def as_dict(self) -> dict:
        from datetime import datetime, timezone

        def iso(t):
            return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")
        return {"model_id": self.model_id, "start": iso(self.start), "end": iso(self.end), "bins": self.bins,
                "min_rows": self.min_rows, "features": [f.as_dict() for f in self.features]}


class Drift:
    """Reference profiles in ClickHouse, and drift measured against them."""

    def __init__(self, tables: EnrichedTables, registry: ModelRegistry, bins: int = 10,
                 written: set | None = None, min_rows: int = 500):
        self.tables = tables
        self.registry = registry
        self.bins = bins
        self.min_rows = min_rows
        self.ref_bins = store_table(tables.database, REFERENCE_BINS)
        self.ref_values = store_table(tables.database, REFERENCE_VALUES)
        # (model, reference) profiles known to be stored; shareable across a process's Drifts
        self._written: set[tuple[str, str]] = set() if written is None else written

    def reference_id(self, model_id: str) -> str:
        digest = self.registry.reference_digest(model_id)
        return f"{digest[:32]}-{self.bins}"

    def ensure_reference(self, spec: ModelSpec) -> str:
        """The model's current reference profile in ClickHouse; its id."""
        ref = self.reference_id(spec.model_id)
        if (spec.model_id, ref) in self._written:
            return ref
        c = self.tables.client
        self.tables.ensure_table()
        have = c.query(f"SELECT count() FROM {self.ref_bins} WHERE model_id = {literal(spec.model_id)} "
                       "AND reference = {ref:String}", parameters={"ref": ref}).result_rows[0][0]
        if not have:
            profiles = profile(spec, self.registry.reference(spec.model_id), self.bins)
            c.insert_arrow(self.ref_bins, _bins_table(spec.model_id, ref, profiles),
                           settings={"insert_deduplication_token": f"bins/{spec.model_id}/{ref}"})
            values = _values_table(spec.model_id, ref, profiles)
            if values.num_rows:
                c.insert_arrow(self.ref_values, values,
                               settings={"insert_deduplication_token": f"values/{spec.model_id}/{ref}"})
        self._written.add((spec.model_id, ref))
        return ref

    def measure(self, model_id: str, window_s: float, feature: str | None = None,
                end: float | None = None, limit: int | None = None) -> DriftReport:
        """Drift of every feature (or one) over [end - window, end)."""
        spec = self.registry.get(model_id)
        names = [c.name for c in spec.columns]
        if feature is not None and feature not in names:
            raise InvalidArgument(f"model {model_id} has no feature or attribute {feature!r}; it has "
                                  f"{', '.join(names)}", "feature")
        columns = [c for c in spec.columns if feature is None or c.name == feature][:limit]
        ref = self.ensure_reference(spec)
        self.tables.ensure_view(spec)
        end = time.time() if end is None else end
        start = end - window_s
        out = [self._feature(spec, ref, col.name, col.numeric, start, end) for col in columns]
        return DriftReport(model_id, start, end, self.bins, out, self.min_rows)

    def _feature(self, spec: ModelSpec, ref: str, name: str, numeric: bool, start: float,
                 end: float) -> FeatureDrift:
        c = self.tables.client
        where_ref = (f"model_id = {literal(spec.model_id)} AND reference = {{ref:String}} "
                     "AND feature = {feature:String}")
        col = quote(name)
        window = (f"timestamp >= fromUnixTimestamp64Milli({int(start * 1000)}, 'UTC') "
                  f"AND timestamp < fromUnixTimestamp64Milli({int(end * 1000)}, 'UTC') AND {col} IS NOT NULL")
        view = self.tables.view(spec.model_id)
        if numeric:
            known = (f"(SELECT groupArray(upper) FROM (SELECT upper FROM {self.ref_bins} FINAL WHERE {where_ref} "
                     "AND upper IS NOT NULL ORDER BY bin)) AS edges")
            bin_of = f"toUInt16(arrayCount(e -> e <= {col}, edges))"
        else:
            known = (f"(SELECT groupArray(category) FROM (SELECT category FROM {self.ref_bins} FINAL "
                     f"WHERE {where_ref} AND category IS NOT NULL ORDER BY bin)) AS cats")
            # (each branch typed alike: mixed integer types would make a Variant)
            bin_of = (f"if(indexOf(cats, {col}) = 0, toUInt16(length(cats)), "
                      f"toUInt16(indexOf(cats, {col}) - 1))")
        sql = f"""
WITH {known},
  ref AS (SELECT bin, count AS rc FROM {self.ref_bins} FINAL WHERE {where_ref}),
  cur AS (SELECT {bin_of} AS bin, count() AS cc FROM {view} WHERE {window} GROUP BY bin),
  joined AS (SELECT r.bin AS bin, r.rc AS rc, ifNull(k.cc, 0) AS cc FROM ref AS r LEFT JOIN cur AS k ON r.bin = k.bin),
  shares AS (
    SELECT (rc + {SMOOTHING}) / (sum(rc) OVER () + {SMOOTHING} * count() OVER ()) AS p,
           (cc + {SMOOTHING}) / (sum(cc) OVER () + {SMOOTHING} * count() OVER ()) AS q,
           (p + q) / 2 AS m, sum(cc) OVER () AS n, sum(rc) OVER () AS rn
    FROM joined)
SELECT any(n), any(rn), sum((q - p) * ln(q / p)), sum(q * ln(q / p)),
       0.5 * sum(q * ln(q / m)) + 0.5 * sum(p * ln(p / m)), sqrt(0.5 * sum(pow(sqrt(q) - sqrt(p), 2)))
FROM shares"""
        params = {"ref": ref, "feature": name}
        rows, ref_rows, psi, kl, js, hellinger = c.query(sql, parameters=params).result_rows[0]
        ks = None
        if numeric and rows:
            ks = c.query(f"""
WITH g AS (
  SELECT v, sum(r) AS r, sum(k) AS k FROM (
    SELECT value AS v, toUInt64(1) AS r, toUInt64(0) AS k FROM {self.ref_values} WHERE {where_ref}
    UNION ALL SELECT assumeNotNull(toFloat64({col})) AS v, toUInt64(0) AS r, toUInt64(1) AS k
    FROM {view} WHERE {window})
  GROUP BY v)
SELECT max(abs(cr / rn - ck / kn)) FROM (
  SELECT sum(r) OVER (ORDER BY v ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS cr,
         sum(k) OVER (ORDER BY v ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS ck,
         sum(r) OVER () AS rn, sum(k) OVER () AS kn FROM g)""", parameters=params).result_rows[0][0]
        rows, ref_rows = int(rows or 0), int(ref_rows or 0)
        if not rows:
            psi = kl = js = hellinger = None
        ks = _num(ks)
        return FeatureDrift(name, "numeric" if numeric else "categorical", rows, ref_rows,
                            _num(psi), _num(kl), _num(js), _num(hellinger), ks, ks_pvalue(ks, rows, ref_rows),
                            rows >= self.min_rows)


def ks_pvalue(statistic: float | None, n: int, m: int) -> float | None:
    """The two-sample KS test's p-value as scipy's ks_2samp(method='asymp') gives it: the
    one-sample Kolmogorov-Smirnov distribution at the effective size n m / (n + m)."""
    if statistic is None or not n or not m:
        return None
    from scipy.stats import kstwo  # imported here: the CLI starts without scipy

    return float(min(1.0, max(0.0, kstwo.sf(statistic, round(n * m / (n + m))))))


def _num(value) -> float | None:
    return None if value is None else float(value)


def _bins_table(model_id: str, ref: str, profiles: list[FeatureProfile]) -> pa.Table:
    cols: dict[str, list] = {k: [] for k in ("model_id", "reference", "feature", "kind", "bin", "lower", "upper",
                                             "category", "count")}
    for p in profiles:
        k = len(p.counts)
        for i in range(k):
            cols["bin"].append(i)
            cols["count"].append(int(p.counts[i]))
            if p.kind == "numeric":
                cols["lower"].append(float(p.edges[i - 1]) if i > 0 else None)
                cols["upper"].append(float(p.edges[i]) if i < k - 1 else None)
                cols["category"].append(None)
            else:
                cols["lower"].append(None)
                cols["upper"].append(None)
                cols["category"].append(p.categories[i] if i < len(p.categories) else None)
        cols["feature"] += [p.feature] * k
        cols["kind"] += [p.kind] * k
    n = len(cols["bin"])
    cols["model_id"], cols["reference"] = [model_id] * n, [ref] * n
    types = {"bin": pa.uint16(), "count": pa.uint64(), "lower": pa.float64(), "upper": pa.float64()}
    return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in cols.items()})


def _values_table(model_id: str, ref: str, profiles: list[FeatureProfile]) -> pa.Table:
    numeric = [p for p in profiles if p.kind == "numeric" and p.values is not None and p.values.size]
    if not numeric:
        return pa.table({"model_id": pa.array([], pa.string())})
    values = np.concatenate([p.values for p in numeric])
    features = np.concatenate([np.full(p.values.size, i) for i, p in enumerate(numeric)])
    return pa.table({"model_id": pa.array(np.full(values.size, model_id)),
                     "reference": pa.array(np.full(values.size, ref)),
                     "feature": pa.DictionaryArray.from_arrays(pa.array(features.astype(np.int32)),
                                                               pa.array([p.feature for p in numeric])
                                                               ).cast(pa.string()),
                     "value": pa.array(values, pa.float64())})


def measure(store, spec: ModelSpec, start: float, end: float, options: dict, limit: int | None = None) -> dict:
    """The drift report over [start, end) (`store`: reports.ReportStore, this thread's Drift)."""
    return store.drift().measure(spec.model_id, end - start, options.get("feature"), end, limit).as_dict()


COLUMNS = ["feature", "kind", "rows", "reference_rows", "psi", "kl", "js", "hellinger", "ks", "ks_pvalue",
           "significant"]


def text(report: dict) -> list:
    """The report as the CLI prints it: lines, and tables as (columns, rows)."""
    out = [f"{report['model_id']}: {report['start']} to {report['end']} against the reference "
           f"({report['bins']} bins per numeric feature)",
           (COLUMNS, [[f[c] for c in COLUMNS] for f in report["features"]])]
    few = [f["feature"] for f in report["features"] if not f["significant"]]
    if few:
        out.append(f"not significant (fewer than {report['min_rows']:,} rows in the window, ENRICHER_DRIFT_MIN_ROWS): "
                   f"{', '.join(few)}")
    return out


def export(model_id: str, report: dict) -> set:
    """The report's figures as gauges (enricher_drift{model, feature, metric}, _rows, _significant);
    the (model, feature) keys set. A figure the window could not give (None) has no series."""
    keys = set()
    for f in report["features"]:
        keys.add((model_id, f["feature"]))
        metrics.DRIFT_ROWS.labels(model_id, f["feature"]).set(f["rows"])
        metrics.DRIFT_SIGNIFICANT.labels(model_id, f["feature"]).set(int(f["significant"]))
        for metric in METRICS:
            if f[metric] is None:
                _remove(metrics.DRIFT, model_id, f["feature"], metric)
            else:
                metrics.DRIFT.labels(model_id, f["feature"], metric).set(f[metric])
    return keys


def unexport(key: tuple) -> None:
    model_id, feature = key
    _remove(metrics.DRIFT_ROWS, model_id, feature)
    _remove(metrics.DRIFT_SIGNIFICANT, model_id, feature)
    for metric in METRICS:
        _remove(metrics.DRIFT, model_id, feature, metric)


def _remove(gauge, *labels) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass
