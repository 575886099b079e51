"""Window reports: what the store says about one model over a time window.

A report takes a model, a window (`window`, how far back from `end`; `end`,
default now) and options of its own, runs SQL on the store, and returns a
JSON document: `model_id`, `start`, `end` and its own figures. Each is one
`Report` in REPORTS; everything else is written once:

- `ReportStore.run` checks the model, the window, the end and the options
  (an error names the field at fault), gives each thread its own connection,
  and measures;
- the API serves each report at `GET /models/{id}/<name>?window=...&end=...`
  through one view (http/api.py);
- the CLI prints each (`enricher <command> MODEL --window 1d [--format json]`)
  through one command body (cli.py: cmd_report), through the running worker
  that holds the embedded store or straight to the store (store/query.py:
  `report`);
- `ReportExporter` turns the reports that have gauges into Prometheus series
  (drift today), for every model, by one worker of the group.

A new report (the label-driven ones: performance, fairness, hotspots) is a
module store/<name>.py with `measure` and `text`, and one entry in REPORTS.
This module imports ClickHouse's client and the models only when a report
runs, so that the CLI can build its commands from REPORTS at no cost.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from types import ModuleType
from typing import Callable

from enricher.config import Settings
from enricher.errors import InvalidArgument, NotFound, RequestError
from enricher.windows import parse_end, parse_window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Report:
    """What the CLI and the API know of a report before running it (this module stays light:
    `enricher --help` lists the reports without loading ClickHouse's client); the report's
    own module (`module()`) measures and prints it."""

    name: str  # the route, GET /models/{id}/<name>, and the report's module, store/<name>.py
    command: str  # the CLI command: enricher <command> MODEL
    help: str
    window_help: str
    default_window: Callable[[Settings], str]
    options: tuple[tuple[str, str], ...] = ()  # (name, help): query parameters and CLI flags
    plots: bool = False  # the module draws it (plot(report, path)): the CLI's --plot FILE.png
    # the module sets gauges (export(model_id, report) -> keys; unexport(key)), for at most
    # export_limit(settings) entries per model
    exports: bool = False
    export_limit: Callable[[Settings], int | None] | None = None

    @property
    def parameters(self) -> tuple[str, ...]:
        return ("window", "end") + tuple(name for name, _ in self.options)

    def module(self) -> ModuleType:
        """The module that measures it: measure(store, spec, start, end, options, limit) -> figures,
        text(report) -> lines and (columns, rows) tables; plot and export when it has them."""
        from enricher.store import drift, fairness, hotspots, importance, performance  # lazy: clickhouse_connect

        return {"drift": drift, "importance": importance, "performance": performance, "fairness": fairness,
                "hotspots": hotspots}[self.name]


REPORTS = {r.name: r for r in (
    Report("drift", "drift", "per-feature drift of a recent window against the reference data",
           "how far back from --end, e.g. 30m, 1h, 7d (default ENRICHER_DRIFT_WINDOW)", lambda s: s.drift_window,
           options=(("feature", "one feature or attribute (default: all)"),),
           exports=True, export_limit=lambda s: s.drift_max_features),
    Report("importance", "explain", "global importance: mean |attribution| per feature over a recent window",
           "how far back from --end, e.g. 1h, 1d, 7d (default 1d)", lambda s: "1d", plots=True),
    Report("performance", "performance", "accuracy and the task's other metrics over the rows whose label has "
           "arrived in a recent window", "how far back from --end, e.g. 1h, 1d, 7d (default 1d)", lambda s: "1d",
           options=(("by", "per segment of a feature or attribute: its values, or ten bins of a numeric one"),),
           exports=True),
    Report("fairness", "fairness", "per sensitive attribute and group: selection rate, TPR and FPR of the raw and "
           "the mitigated decision, and each constraint's gap", "how far back from --end, e.g. 1h, 1d, 7d (default 1d)",
           lambda s: "1d", exports=True),
    Report("hotspots", "hotspots", "the serving hotspots (regions where the model is often wrong): their rules, and "
           "the rows and accuracy of each in a recent window", "how far back from --end, e.g. 1h, 1d, 7d (default 1d)",
           lambda s: "1d"),
)}


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


class ReportStore:
    """Reports over the store: a connection (and a drift state) per thread, reference
    profiles written once per process."""

    def __init__(self, settings: Settings, registry, schema=None):
        from enricher.store.clickhouse import Schema  # lazy: clickhouse_connect

        self.settings = settings
        self.registry = registry  # models.registry.ModelRegistry
        self.schema = schema or Schema()
        self._local = threading.local()
        self._written: set = set()  # (model, reference) profiles stored, shared by the threads' Drifts

    def tables(self):
        """This thread's EnrichedTables (store/clickhouse.py)."""
        from enricher.store.clickhouse import EnrichedTables, connect  # lazy: clickhouse_connect

        tables = getattr(self._local, "tables", None)
        if tables is None:
            tables = self._local.tables = EnrichedTables.from_settings(connect(self.settings), self.settings,
                                                                       self.schema)
        return tables

    def drift(self):
        """This thread's drift.Drift (its reference profiles shared by the threads)."""
        from enricher.store.drift import Drift  # lazy: clickhouse_connect

        state = getattr(self._local, "drift", None)
        if state is None or state.tables is not self.tables():
            state = self._local.drift = Drift(self.tables(), self.registry, self.settings.drift_bins,
                                                    self._written, self.settings.drift_min_rows)
        return state

    def forget_connection(self) -> None:
        """Close this thread's connection (a failed one is never reused); the next call opens another."""
        tables = getattr(self._local, "tables", None)
        self._local.tables = self._local.drift = None
        if tables is not None:
            try:
                tables.client.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass

    close = forget_connection

    def spec(self, model_id: str):
        from enricher.models.registry import UnknownModel  # lazy: pyarrow
        from enricher.models.spec import SpecError, check_model_id  # lazy: pyarrow

        try:
            return self.registry.get(check_model_id(model_id))
        except (SpecError, UnknownModel) as exc:
            raise NotFound(str(exc), "model_id") from None

    def run(self, report: Report, model_id: str, window: str | None = None, end=None,
            options: dict | None = None, limit: int | None = None) -> dict:
        """The report on `model_id` over [end - window, end). Raises NotFound (the model)
        and InvalidArgument naming the field at fault (window, end, an option)."""
        spec = self.spec(model_id)
        options = {k: v for k, v in (options or {}).items() if v is not None}
        unknown = sorted(set(options) - {name for name, _ in report.options})
        if unknown:
            raise InvalidArgument(f"unknown parameter(s) {', '.join(unknown)}; use "
                                  f"{', '.join(report.parameters)}", unknown[0])
        seconds = _field("window", parse_window, window or report.default_window(self.settings))
        stop = _field("end", parse_end, end)
        stop = time.time() if stop is None else stop
        start = stop - seconds
        try:
            self.tables().ensure_view(spec)
            doc = report.module().measure(self, spec, start, stop, options, limit)
        except RequestError:  # the request's fault (or a report that does not apply): the connection is fine
            raise
        except Exception:
            self.forget_connection()  # a connection that failed mid-request is not reused
            raise
        return {"model_id": spec.model_id, "start": iso(start), "end": iso(stop), **doc}

    def write_reference(self, model_id: str) -> None:
        """The model's reference histograms, for drift queries and dashboards, at once (after a
        registration); on failure a warning: the exporter or the first drift query writes them."""
        try:
            self.drift().ensure_reference(self.registry.get(model_id))
        except Exception as exc:  # noqa: BLE001 - the registration stands; the next reader retries
            self.forget_connection()
            log.warning("model %s: reference histograms not written yet (%s: %s); the drift export "
                        "writes them", model_id, type(exc).__name__, str(exc)[:300])


def _field(name: str, parse, text):
    try:
        return parse(text)
    except InvalidArgument as exc:
        raise InvalidArgument(str(exc), name) from None


class ReportExporter:
    """The reports that have gauges, over each one's default window, for every model
    (drift: enricher_drift{model, feature, metric}, bounded by ENRICHER_DRIFT_MAX_FEATURES
    features per model). Series of a model or entry gone are removed."""

    def __init__(self, settings: Settings, registry):
        self.settings = settings
        self.registry = registry
        self.store = ReportStore(settings, registry)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="report-export")
        self.reports = [r for r in REPORTS.values() if r.exports]
        self.exported: dict[str, set] = {r.name: set() for r in self.reports}

    def run(self) -> None:
        for report in self.reports:
            seen: set = set()
            limit = report.export_limit(self.settings) if report.export_limit else None
            for model_id in self.registry.ids():
                try:
                    doc = self.store.run(report, model_id, limit=limit)
                except RequestError:  # a report that does not apply to this model (fairness of a regression)
                    continue
                except Exception as exc:  # noqa: BLE001 - one model's failure leaves the others' gauges
                    log.warning("%s of model %s not exported: %s: %s", report.name, model_id, type(exc).__name__,
                                str(exc)[:300])
                    continue
                seen |= report.module().export(model_id, doc)
            for key in self.exported[report.name] - seen:  # a model or entry gone
                report.module().unexport(key)
            self.exported[report.name] = seen

    def clear(self) -> None:
        for report in self.reports:
            for key in self.exported[report.name]:
                report.module().unexport(key)
            self.exported[report.name] = set()
