"""Reading the enriched tables: `enricher query`, the demo, the tests.

Directly against the store, or through the running worker that holds the
embedded one (chDB allows one process per data directory); the same rules
either way (enricher/store/sqlguard.py).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from enricher.config import Settings
from enricher.errors import UserError


def query(settings: Settings, sql: str) -> tuple[list[str], list]:
    """Columns and rows of a read-only query (see `ask`)."""
    answer = ask(settings, sql)
    return answer.columns, answer.rows


def ask(settings: Settings, sql: str):
    """Run a read-only query: directly, or through the running worker that
    holds the embedded store (chDB allows one process per data directory).
    Either way the same rules apply (sqlguard.py, queries.py): reads of the
    enriched tables only, within the query limits; the answer says whether
    rows were cut at ENRICHER_QUERY_MAX_ROWS."""
    from enricher.store.queries import Answer

    worker = running_worker(settings)
    if worker:
        req = urllib.request.Request(worker + "/query", data=json.dumps({"sql": sql}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        if settings.api_token:
            req.add_header("Authorization", f"Bearer {settings.api_token}")
        try:
            with urllib.request.urlopen(req, timeout=settings.query_max_seconds + 300) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                message = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code}: {body[:200].decode('utf-8', 'replace')}"
            raise UserError(f"query through the running worker at {worker} failed: {message}") from None
        return Answer(doc["columns"], doc["rows"], bool(doc.get("truncated")), doc.get("row_limit"))
    from clickhouse_connect.driver.exceptions import ClickHouseError

    from enricher.store.queries import QueryRunner
    from enricher.store.sqlguard import QueryRefused

    try:
        return QueryRunner(settings).run(sql)
    except QueryRefused as exc:
        raise UserError(f"query refused: {exc}") from None
    except ClickHouseError as exc:
        raise UserError(f"ClickHouse refused the query: {exc}") from None


def store_tables(settings: Settings):
    """The enriched tables for a maintenance command (migrate, drop-rows): straight to the store."""
    from enricher.store.clickhouse import EnrichedTables, connect

    worker = running_worker(settings)
    if worker:
        raise UserError(f"a worker ({worker}) holds the embedded store in {settings.data_dir}; stop it first "
                        "(chDB allows one process per data directory)")
    return EnrichedTables.from_settings(connect(settings), settings)


def drop_rows(settings: Settings, model_id: str) -> None:
    """Delete a model's enriched rows, labels and view: through the running worker
    that holds the embedded store (DELETE /models/{id}/rows), or directly."""
    from enricher.models.spec import check_model_id

    check_model_id(model_id)
    worker = running_worker(settings)
    if worker is None:
        tables = store_tables(settings)
        try:
            tables.drop_model(model_id)
        finally:
            tables.client.close()
        return
    req = urllib.request.Request(f"{worker}/models/{model_id}/rows", method="DELETE")
    if settings.api_token:
        req.add_header("Authorization", f"Bearer {settings.api_token}")
    try:
        with urllib.request.urlopen(req, timeout=600):
            pass
    except urllib.error.HTTPError as exc:
        raise UserError(f"deleting through the running worker at {worker} failed: HTTP {exc.code} "
                        f"{exc.read()[:300].decode('utf-8', 'replace')}") from None


def drift_report(settings: Settings, model_id: str, window: str, feature: str | None = None,
                 end: str | None = None) -> dict:
    """Per-feature drift (drift.py): through the running worker that holds the
    embedded store (GET /models/{id}/drift), or directly."""
    worker = running_worker(settings)
    if worker is None:
        from enricher.models.registry import ModelRegistry
        from enricher.store.drift import DriftService

        service = DriftService(settings, ModelRegistry(settings.registry_dir))
        try:
            return service.measure(model_id, window, feature, end).as_dict()
        except ValueError as exc:
            raise UserError(str(exc)) from None
        finally:
            service.close()
    from urllib.parse import quote, urlencode

    params = urlencode({k: v for k, v in {"window": window, "feature": feature, "end": end}.items() if v})
    req = urllib.request.Request(f"{worker}/models/{quote(model_id)}/drift?{params}")
    if settings.api_token:
        req.add_header("Authorization", f"Bearer {settings.api_token}")
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
        raise UserError(f"drift through the running worker at {worker}: {message}") from None


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
