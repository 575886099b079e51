"""The ClickHouse sink, after Quix Streams' sinks: one write per batch.

The worker acknowledges a batch's messages (so their offsets may be
committed) only after `write` returned: an offset is never committed ahead of
its rows.

A failed write is classified, because what to do next depends on it:
- `StoreUnavailable`: the store could not take the batch now (connection
  refused or reset, a timeout, a 5xx without a ClickHouse error, too many
  parts, memory, a readonly replica...). The same batch is tried again later.
- `StoreRejected`: the store refused the data itself (a value it will not
  take, a constraint, a schema that does not match). Trying again changes
  nothing; the caller splits the batch to find the rows at fault.
Anything else raised from here is a bug on our side of the wire.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError, OperationalError

from enricher import metrics
from enricher.config import Settings
from enricher.errors import EnricherError
from enricher.models.spec import ModelSpec
from enricher.store.clickhouse import EnrichedTables, Schema, connect, store_table

# ClickHouse error codes that say "not now" rather than "not this data".
TRANSIENT_CODES = frozenset({
    3,    # UNEXPECTED_END_OF_FILE (a connection cut mid-body)
    159,  # TIMEOUT_EXCEEDED
    164,  # READONLY (a replica in read-only mode, e.g. lost ZooKeeper/Keeper)
    202,  # TOO_MANY_SIMULTANEOUS_QUERIES
    203,  # NO_FREE_CONNECTION
    209,  # SOCKET_TIMEOUT
    210,  # NETWORK_ERROR
    236,  # ABORTED
    241,  # MEMORY_LIMIT_EXCEEDED
    242,  # TABLE_IS_READ_ONLY
    252,  # TOO_MANY_PARTS
    279,  # ALL_CONNECTION_TRIES_FAILED
    319,  # UNKNOWN_STATUS_OF_INSERT
    394,  # QUERY_WAS_CANCELLED
    425,  # SYSTEM_ERROR
    999,  # KEEPER_EXCEPTION
    32,   # ATTEMPT_TO_READ_AFTER_EOF (a body cut by the network)
    33,   # CANNOT_READ_ALL_DATA
    75,   # CANNOT_WRITE_TO_FILE_DESCRIPTOR
    198,  # DNS_ERROR
    243,  # NOT_ENOUGH_SPACE (a disk filled up: writes resume once there is room)
    285,  # TOO_FEW_LIVE_REPLICAS
    286,  # UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE
    439,  # CANNOT_SCHEDULE_TASK
    1000,  # POCO_EXCEPTION (network errors inside the server)
    # The store will not let this worker in (wrong password, a revoked grant):
    # not a fault of the data, and a fix by an operator changes it. Pausing
    # (and saying so in the log) beats dead-lettering the whole stream.
    192,  # UNKNOWN_USER
    193,  # WRONG_PASSWORD
    194,  # REQUIRED_PASSWORD
    497,  # ACCESS_DENIED
    516,  # AUTHENTICATION_FAILED
})
# Codes meaning the table is not what this worker writes: every row of every
# batch would fail the same way, so the batch is not split row by row.
SCHEMA_CODES = frozenset({
    8,    # THERE_IS_NO_COLUMN
    10,   # NOT_FOUND_COLUMN_IN_BLOCK
    16,   # NO_SUCH_COLUMN_IN_TABLE
    20,   # NUMBER_OF_COLUMNS_DOESNT_MATCH
    47,   # UNKNOWN_IDENTIFIER
    48,   # NOT_IMPLEMENTED (e.g. a column changed to a type our values cannot become)
    53,   # TYPE_MISMATCH
    60,   # UNKNOWN_TABLE
    81,   # UNKNOWN_DATABASE
})


class StoreUnavailable(EnricherError):
    """The store could not take the batch now; the same batch is retried."""


class StoreRejected(EnricherError):
    """The store refused the batch's data; a retry would be refused too."""

    def __init__(self, message: str, table: str, code: int | None):
        super().__init__(message)
        self.table = table
        self.code = code

    @property
    def schema(self) -> bool:
        return self.code in SCHEMA_CODES


def classify(exc: BaseException, table: str) -> Exception:
    """The store's exception as StoreUnavailable or StoreRejected (or itself: a bug)."""
    if isinstance(exc, OperationalError):  # transport: refused, reset, timed out
        return StoreUnavailable(str(exc))
    if isinstance(exc, DatabaseError):
        code = exc.code
        if code is None or code in TRANSIENT_CODES:  # an HTTP 5xx from a proxy has no ClickHouse code
            return StoreUnavailable(str(exc))
        return StoreRejected(str(exc), table, code)
    if isinstance(exc, ClickHouseError):
        return StoreUnavailable(str(exc))
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return StoreUnavailable(f"{type(exc).__name__}: {exc}")
    return exc


class ClickHouseSink:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.table = store_table(settings.clickhouse_database)
        self._local = threading.local()
        self._schema = Schema()  # DDL done, for every thread's connection

    @property
    def tables(self) -> EnrichedTables:
        # one connection per thread: clickhouse-connect clients are not shared across threads
        tables = getattr(self._local, "tables", None)
        if tables is None:
            try:
                client = connect(self.settings)
            except Exception as exc:
                raise classify(exc, self.table) from exc
            tables = self._local.tables = EnrichedTables.from_settings(client, self.settings, self._schema)
        return tables

    def forget_connection(self) -> None:
        """This thread's next use opens a new connection (the old one is closed, as far as it can be)."""
        tables = getattr(self._local, "tables", None)
        self._local.tables = None
        if tables is not None:
            try:
                tables.client.close()
            except Exception:  # noqa: BLE001 - a connection that failed may fail to close, too
                pass

    def _failed(self, exc: Exception) -> Exception:
        error = classify(exc, self.table)
        if isinstance(error, StoreUnavailable):
            self.forget_connection()  # a connection that failed mid-request is not reused
        return error

    def prepare(self, specs: list[ModelSpec]) -> None:
        """The storage table and the models' views, before any insert; a no-op once done
        (the DDL runs once per process, not per thread, and not again on a retry)."""
        try:
            for spec in specs:
                self.tables.ensure_view(spec)
        except (StoreUnavailable, StoreRejected):
            raise
        except Exception as exc:
            raise self._failed(exc) from exc

    def write_labels(self, table: pa.Table, token: str | None = None) -> None:
        """One insert of a batch's label updates (labels.label_table)."""
        try:
            self.tables.insert_labels(table, token)
        except (StoreUnavailable, StoreRejected):
            raise
        except Exception as exc:
            raise self._failed(exc) from exc

    def write(self, table: pa.Table, rows_per_model: dict[str, int], token: str | None = None) -> None:
        """One insert for the whole batch, every model's rows together (`token`:
        the batch's deduplication token, see EnrichedTables.insert)."""
        started = time.perf_counter()
        try:
            self.tables.insert(table, token)
        except (StoreUnavailable, StoreRejected):
            metrics.INSERT_FAILURES.inc()
            raise
        except Exception as exc:
            metrics.INSERT_FAILURES.inc()
            raise self._failed(exc) from exc
        done = time.time()
        metrics.INSERT_SECONDS.observe(time.perf_counter() - started)
        for model_id, n in rows_per_model.items():
            metrics.INSERT_ROWS.labels(model_id).inc(n)
        ts = table.column("timestamp").cast(pa.int64()).to_numpy()
        metrics.observe_many(metrics.E2E_LATENCY, np.maximum(done - ts / 1000.0, 0.0))
