"""Analyst queries over the enriched tables: planned by the guard, run under limits the engine enforces.

Each query gets its own connection, opened for it and closed after it, so no
answer can carry bytes of another caller's (a connection left mid-stream by
a timed-out query once answered the next caller with the old header). The
connection's *session* carries the limits (`SET`, on the embedded engine; the
query user's settings profile on a server), never text appended to the query:

- `max_execution_time`, `max_memory_usage`, `max_threads`,
  `max_rows_to_read`, `max_result_bytes`: time, memory, CPU and reading;
- `os_thread_priority`: the engine's threads for a query run at a lower
  scheduling priority than the stream's inserts;
- `readonly=1`, last: the query can change none of the above (a SETTINGS
  clause is refused by the guard, and by the engine too);
- the session's current database is the views' database, so a table name
  without a database names a model's view or nothing.

Rows are cut by the guard's outer `LIMIT row_limit + 1`, which the engine
stops at however large its blocks are; the answer says when rows were cut.

Queries run in their own bounded pool (`QueryPool`): at most
ENRICHER_QUERY_CONCURRENCY at once, ENRICHER_QUERY_QUEUE more waiting, and
past that the caller is told to come back (HTTP 429, Retry-After). The batch
path never waits on it: it has its own executor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

import orjson

from enricher.config import Settings
from enricher.errors import EnricherError, UserError
from enricher.store.sqlguard import STORE_TABLES, Guard

log = logging.getLogger(__name__)
# Nice value of the query pool's threads: the stream's threads (0) win the CPU when both want it.
QUERY_THREAD_NICE = 10


@dataclass
class Answer:
    columns: list[str]
    rows: list
    truncated: bool
    row_limit: int | None

    def json_chunks(self, rows_per_chunk: int = 2000):
        """The answer as JSON, in pieces (encoded in the caller's thread, never on the event loop)."""
        head = {"columns": self.columns, "truncated": self.truncated, "row_limit": self.row_limit}
        yield _dumps(head)[:-1] + b',"rows":['
        for start in range(0, len(self.rows), rows_per_chunk):
            piece = _dumps(self.rows[start:start + rows_per_chunk])[1:-1]
            yield (b"," if start else b"") + piece
        yield b"]}"


def jsonable(value):
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _dumps(value) -> bytes:
    try:
        return orjson.dumps(value, default=jsonable, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # integers past 64 bits (UInt128/256): the standard library takes any int
        import json

        return json.dumps(value, default=jsonable).encode()


def session_limits(settings: Settings) -> dict:
    """The settings a query's session runs under; readonly last, so that it locks the others."""
    limits = {
        "max_execution_time": settings.query_max_seconds,
        "timeout_overflow_mode": "throw",
        "max_memory_usage": settings.query_max_memory,
        "max_threads": settings.query_max_threads,
        "max_rows_to_read": settings.query_max_rows_read,
        "max_result_bytes": settings.query_max_result_bytes,
        "result_overflow_mode": "throw",
        "os_thread_priority": 19,
    }
    limits["readonly"] = 1
    return limits


class QueryRunner:
    """Checked, limited, read-only queries over the enriched tables, each on a fresh connection."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.server = not settings.clickhouse_url.startswith("chdb:")
        self.guard = Guard(settings.clickhouse_database, settings.query_max_rows)

    def connect(self):
        """A connection for one query, the limits in its session."""
        from enricher.store.clickhouse import connect  # lazy: clickhouse_connect, pyarrow

        if self.server and self.settings.query_user:
            # On a server the query user's settings profile holds the limits, with
            # constraints that no request can lift (`enricher schema --query-user`).
            return connect(self.settings, username=self.settings.query_user,
                           password=self.settings.query_password or "")
        return connect(self.settings, session_settings=session_limits(self.settings))

    def run(self, sql: str) -> Answer:
        from clickhouse_connect.driver.exceptions import ClickHouseError

        client = self.connect()
        try:
            plan = self.guard.plan(client, sql)
            # The views' database current while the query runs: a table name
            # without a database names a model's view (or nothing).
            client.database = self.settings.clickhouse_database
            try:
                result = client.query(plan.sql)
            except ClickHouseError as exc:
                if "UNKNOWN_DATABASE" not in str(exc) or (self.server and self.settings.query_user):
                    raise
                # A store no worker has laid out yet: its (empty) views' database is made
                # here, with the store's own connection, so that `SELECT 1` works on it too.
                self._create_views_database()
                result = client.query(plan.sql)
            rows = [tuple(r) for r in result.result_rows]
        finally:
            client.close()
        truncated = plan.row_limit is not None and len(rows) > plan.row_limit
        if truncated:
            del rows[plan.row_limit:]
        return Answer(list(result.column_names), rows, truncated, plan.row_limit)

    def _create_views_database(self) -> None:
        from enricher.store.clickhouse import connect, quote  # lazy: clickhouse_connect, pyarrow

        owner = connect(self.settings)
        try:
            owner.command(f"CREATE DATABASE IF NOT EXISTS {quote(self.settings.clickhouse_database)}")
        finally:
            owner.close()

    def close(self) -> None:
        """Nothing is kept between queries; here for callers that close what they open."""


class QueryBusy(EnricherError):
    """Every place in the query pool and its queue is taken."""

    def __init__(self, retry_after: int):
        super().__init__(f"{retry_after}")
        self.retry_after = retry_after


def _lower_priority() -> None:
    try:  # Linux: a thread's own nice value; raising it needs no privilege
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), QUERY_THREAD_NICE)
    except (OSError, AttributeError):
        pass


class QueryPool:
    """At most `concurrency` queries at once, `queue` more waiting; past that, QueryBusy."""

    def __init__(self, runner: QueryRunner, concurrency: int, queue: int):
        self.runner = runner
        self.limit = concurrency + queue
        self.outstanding = 0
        self.retry_after = max(1, int(runner.settings.query_max_seconds))
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="enricher-query", initializer=_lower_priority)

    async def run(self, sql: str) -> list[bytes]:
        """The answer as JSON pieces, computed and encoded in the pool's threads."""
        if self.outstanding >= self.limit:
            raise QueryBusy(self.retry_after)
        self.outstanding += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, lambda: list(self.runner.run(sql).json_chunks()))
        finally:
            self.outstanding -= 1


def query_user_ddl(settings: Settings, salt: str | None = None) -> list[str]:
    """The statements a DBA runs on a ClickHouse server for /query's read-only user
    (`enricher schema --query-user`): a settings profile whose limits no request
    can change (CONST constraints, readonly=2 so that the client's own harmless
    settings still pass), a role that may SELECT the views and the storage tables
    they read, and the user, identified by the SHA-256 of its password and a salt
    (the password itself is never printed)."""
    import hashlib
    import secrets

    from enricher.store.clickhouse import quote  # lazy: clickhouse_connect, pyarrow

    user = settings.query_user or "enricher_query"
    if not settings.query_password:
        raise UserError("set ENRICHER_QUERY_PASSWORD (or ENRICHER_QUERY_PASSWORD_FILE) to the query user's password: "
                        "the CREATE USER statement carries its salted SHA-256, not the password")
    salt = salt or secrets.token_hex(16)
    digest = hashlib.sha256((settings.query_password + salt).encode()).hexdigest()
    db, store = settings.clickhouse_database, f"{settings.clickhouse_database}_store"
    limits = {k: v for k, v in session_limits(settings).items() if k != "readonly"}
    profile, role = quote(f"{user}_profile"), quote(f"{user}_reader")

    def value(v):
        return f"'{v}'" if isinstance(v, str) else repr(v)

    constraints = ", ".join(f"{k} = {value(v)} CONST" for k, v in limits.items())
    # On a cluster: on every node (a Distributed read runs on the shards), and on the tables the rows live in.
    cluster = settings.clickhouse_cluster
    on = f" ON CLUSTER {quote(cluster)}" if cluster else ""
    tables = [*STORE_TABLES, *(f"{t}_local" for t in STORE_TABLES)] if cluster else list(STORE_TABLES)
    statements = [
        f"CREATE SETTINGS PROFILE OR REPLACE {profile}{on} SETTINGS readonly = 2, {constraints}",
        f"CREATE ROLE OR REPLACE {role}{on}",
        f"GRANT{on} SELECT ON {quote(db)}.* TO {role}",
    ]
    statements += [f"GRANT{on} SELECT ON {quote(store)}.{quote(t)} TO {role}" for t in tables]
    statements.append(f"CREATE USER OR REPLACE {quote(user)}{on} IDENTIFIED WITH sha256_hash BY '{digest}' "
                      f"SALT '{salt}' DEFAULT ROLE {role} SETTINGS PROFILE {profile} DEFAULT DATABASE {quote(db)}")
    return statements
