"""Reading the store from the command line: `enricher query`, the window reports,
`models drop-rows`, the demo, the tests.

Directly against the store, or through the running worker that holds the
embedded one (chDB allows one process per data directory): `worker_or_direct`
decides, once for every caller. The same rules apply either way (sqlguard.py,
queries.py, reports.py). Light on purpose: `enricher query` imports this, and
ClickHouse's client only when it goes to the store itself.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Callable, TypeVar
from urllib.parse import quote, urlencode

from enricher.config import Settings
from enricher.errors import Unavailable, UserError
from enricher.store.queries import Answer, QueryRunner
from enricher.store.reports import REPORTS, ReportStore
from enricher.store.sqlguard import QueryRefused

T = TypeVar("T")


def worker_or_direct(settings: Settings, direct: Callable[[], T], method: str, path: str, what: str, *,
                     body: dict | None = None, timeout: float = 300) -> T | dict:
    """`direct()` when no worker holds the embedded store, else the running worker's JSON
    answer to `method path` (None for an empty answer); an error answer becomes a UserError
    that says what was being done (`what`) and the worker's own message, or Unavailable
    when the worker is busy or failing (429, 5xx: asking again may work)."""
    worker = running_worker(settings)
    if worker is None:
        return direct()
    req = urllib.request.Request(worker + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={} if body is None else {"Content-Type": "application/json"})
    if settings.api_token:
        req.add_header("Authorization", f"Bearer {settings.api_token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
    except urllib.error.HTTPError as exc:
        answer = exc.read()
        try:
            message = json.loads(answer)["error"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}: {answer[:300].decode('utf-8', 'replace')}"
        kind = Unavailable if exc.code == 429 or exc.code >= 500 else UserError
        raise kind(f"{what} through the running worker at {worker} failed: {message}") from None
    return json.loads(data) if data else None


def query(settings: Settings, sql: str) -> tuple[list[str], list]:
    """Columns and rows of a read-only query (see `ask`)."""
    answer = ask(settings, sql)
    return answer.columns, answer.rows


def ask(settings: Settings, sql: str) -> Answer:
    """Run a read-only query: reads of the enriched tables only, within the query
    limits; the answer says whether rows were cut at ENRICHER_QUERY_MAX_ROWS."""
    def direct() -> Answer:
        from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError  # lazy: clickhouse_connect

        try:
            return QueryRunner(settings).run(sql)
        except QueryRefused as exc:
            raise UserError(f"query refused: {exc}") from None
        except OperationalError as exc:  # the server unreachable, or failing after the client's retries
            raise Unavailable(f"ClickHouse did not answer the query: {exc}") from None
        except ClickHouseError as exc:
            raise UserError(f"ClickHouse refused the query: {exc}") from None
    doc = worker_or_direct(settings, direct, "POST", "/query", "query", body={"sql": sql},
                           timeout=settings.query_max_seconds + 300)
    if isinstance(doc, Answer):
        return doc
    return Answer(doc["columns"], doc["rows"], bool(doc.get("truncated")), doc.get("row_limit"))


def report(settings: Settings, name: str, model_id: str, window: str | None = None, end: str | None = None,
           options: dict | None = None) -> dict:
    """A window report (reports.py) on one model: GET /models/{id}/<name> of the running
    worker, or measured on the store here."""
    options = {k: v for k, v in (options or {}).items() if v is not None}

    def direct() -> dict:
        from enricher.control.registry import open_registry  # lazy: pyarrow

        store = ReportStore(settings, open_registry(settings))
        try:
            return store.run(REPORTS[name], model_id, window, end, options)
        finally:
            store.close()
    params = urlencode({k: v for k, v in {"window": window, "end": end, **options}.items() if v})
    return worker_or_direct(settings, direct, "GET", f"/models/{quote(model_id, safe='')}/{name}?{params}", name)


def report_text(name: str, doc: dict) -> str:
    """A window report as `enricher NAME` prints it (its module's text, tables laid out)."""
    return "\n".join(part if isinstance(part, str) else format_table(*part) for part in REPORTS[name].module().text(doc))


def store_tables(settings: Settings):
    """The enriched tables for a maintenance command (migrate): straight to the store."""
    from enricher.store.clickhouse import EnrichedTables, connect  # lazy: clickhouse_connect, pyarrow

    worker = running_worker(settings)
    if worker:
        raise UserError(f"a worker ({worker}) holds the embedded store in {settings.data_dir}; stop it first "
                        "(chDB allows one process per data directory)")
    return EnrichedTables.from_settings(connect(settings), settings)


def drop_rows(settings: Settings, model_id: str) -> None:
    """Delete a model's enriched rows, labels and view: through the running worker
    that holds the embedded store (DELETE /models/{id}/rows), or directly."""
    from enricher.models.spec import check_model_id  # lazy: pyarrow

    check_model_id(model_id)

    def direct() -> None:
        from enricher.store.clickhouse import drop_model_rows  # lazy: clickhouse_connect

        drop_model_rows(settings, model_id)
    worker_or_direct(settings, direct, "DELETE", f"/models/{model_id}/rows", "deleting", timeout=600)


def running_worker(settings: Settings) -> str | None:
    if not settings.clickhouse_url.startswith("chdb:"):
        return None
    try:
        info = json.loads((settings.data_dir / "worker.json").read_text())
        os.kill(info["pid"], 0)
    except (FileNotFoundError, ProcessLookupError, ValueError, KeyError, PermissionError):
        return None
    return info["url"]


def format_table(columns: list[str], rows: list) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return "NULL" if v is None else str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in text]
    return "\n".join(lines)
