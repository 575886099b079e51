"""ClickHouse: connections, the enriched tables, and queries.

One code path for the embedded engine (chDB, `chdb:///PATH`) and a server
(`http(s)://USER:PASSWORD@HOST:PORT/DATABASE`): both go through
clickhouse-connect, only `get_client`'s arguments differ.

Layout, for a database setting `enricher`:

    enricher_store.inferences  every model's rows, one ReplacingMergeTree
                               ORDER BY (model_id, inference_id); features and
                               attributes in two maps (numeric, categorical)
    enricher.<model_id>        VIEW ... FINAL WHERE model_id = '<model_id>': the
                               model's rows with one column per feature

Why one table: a worker's batch holds rows of many models, and one insert per
batch, whatever the number of models, is what keeps a stream over a thousand
models as fast as a stream over one (a table per model means an insert per
model per batch). The view gives each model its own typed columns, and a new
feature is a new view, not an ALTER.

At-least-once delivery means a batch may be written twice after a crash; the
copies share (model_id, inference_id), so the view shows each inference once,
and background merges drop the copies from storage.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

import clickhouse_connect
import pyarrow as pa

from models import ENRICHMENTS
from models.spec import ModelSpec, check_model_id

from .config import Settings

TABLE = "inferences"
_NUM_MAP = pa.map_(pa.string(), pa.float64())
_CAT_MAP = pa.map_(pa.string(), pa.string())


def _nullable(arrow_type: pa.DataType) -> str:
    mapping = {pa.float64(): "Float64", pa.float32(): "Float32", pa.string(): "String",
               pa.int64(): "Int64", pa.uint32(): "UInt32"}
    if arrow_type not in mapping:
        raise TypeError(f"no ClickHouse type for enrichment column type {arrow_type}")
    return f"Nullable({mapping[arrow_type]})"


def _store_columns() -> dict[str, tuple[str, pa.DataType]]:
    cols = {
        "model_id": ("LowCardinality(String)", pa.string()),
        "inference_id": ("String", pa.string()),
        "timestamp": ("DateTime64(3, 'UTC')", pa.timestamp("ms", tz="UTC")),
        "numeric": ("Map(LowCardinality(String), Nullable(Float64))", _NUM_MAP),
        "categorical": ("Map(LowCardinality(String), Nullable(String))", _CAT_MAP),
        "prediction": ("Nullable(Float64)", pa.float64()),
        "prediction_class": ("LowCardinality(Nullable(String))", pa.string()),
        "label": ("Nullable(Float64)", pa.float64()),
        "label_class": ("LowCardinality(Nullable(String))", pa.string()),
    }
    for name, enrichment in ENRICHMENTS.items():
        for col, arrow_type in enrichment.output_columns().items():
            cols[col] = (_nullable(arrow_type), arrow_type)
        cols[f"{name}_version"] = ("Nullable(UInt32)", pa.uint32())
    cols.update({
        "_ingested_at": ("DateTime64(6, 'UTC')", pa.timestamp("us", tz="UTC")),
        "_partition": ("UInt32", pa.uint32()),
        "_offset": ("UInt64", pa.uint64()),
    })
    return cols


#: Every column of the storage table: name -> (ClickHouse type, Arrow type).
STORE_COLUMNS = _store_columns()
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quote(identifier: str) -> str:
    """Quote an identifier for SQL; refuses anything but plain names."""
    if not _IDENT.match(identifier):
        raise ValueError(f"refusing identifier {identifier!r} in SQL: only letters, digits and _ are allowed")
    return f"`{identifier}`"


def connect(settings: Settings):
    """A clickhouse-connect client for the configured URL (reads go through api.QueryRunner,
    which checks them and sets their limits)."""
    url = settings.clickhouse_url
    parts = urlsplit(url)
    extra = {}
    if parts.scheme == "chdb":
        path = unquote(parts.netloc + parts.path)
        return clickhouse_connect.get_client(interface="chdb", path=path, **extra)
    password = unquote(parts.password or "") or settings.clickhouse_password or ""
    # A store that accepts and never answers must fail the insert, not hold it forever.
    return clickhouse_connect.get_client(
        interface=parts.scheme, host=parts.hostname, port=parts.port,
        username=unquote(parts.username or "default"), password=password,
        database="default", connect_timeout=min(10.0, settings.clickhouse_timeout),
        send_receive_timeout=settings.clickhouse_timeout, **extra)


def view_columns(spec: ModelSpec) -> list[tuple[str, str]]:
    """The model's view: (column name, SQL expression over the storage table)."""
    cols = [("inference_id", "inference_id"), ("timestamp", "timestamp")]
    for c in spec.features + spec.attributes:
        source = "numeric" if c.numeric else "categorical"
        cols.append((c.name, f"{source}['{c.name}']"))
    suffix = "" if spec.prediction_type == "numeric" else "_class"
    cols += [("prediction", f"prediction{suffix}"), ("label", f"label{suffix}")]
    for name, enrichment in ENRICHMENTS.items():
        cols += [(col, col) for col in enrichment.output_columns()]
        cols.append((f"{name}_version", f"{name}_version"))
    cols += [(c, c) for c in ("_ingested_at", "_partition", "_offset")]
    return cols


class Schema:
    """What DDL has been run: shared by every connection of a process, so
    that the table and each view are created once, not once per thread."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.table_ready = False
        self.views: dict[str, ModelSpec] = {}


def store_table(database: str) -> str:
    """The storage table's quoted name for a database setting."""
    return f"{quote(database + '_store')}.{quote(TABLE)}"


class EnrichedTables:
    """Creates (on demand) the storage table and each model's view, and writes batches."""

    def __init__(self, client, database: str, schema: Schema | None = None):
        self.client = client
        self.database = database
        self.store = f"{database}_store"
        self.schema = schema or Schema()
        quote(database), quote(self.store)

    @property
    def table(self) -> str:
        return store_table(self.database)

    def ensure_table(self) -> None:
        if self.schema.table_ready:
            return
        with self.schema.lock:
            if not self.schema.table_ready:
                self._create_table()

    def _create_table(self) -> None:
        self.client.command(f"CREATE DATABASE IF NOT EXISTS {quote(self.database)}")
        self.client.command(f"CREATE DATABASE IF NOT EXISTS {quote(self.store)}")
        body = ",\n  ".join(f"{quote(n)} {t}" for n, (t, _) in STORE_COLUMNS.items())
        self.client.command(f"CREATE TABLE IF NOT EXISTS {self.table} (\n  {body}\n) "
                            "ENGINE = ReplacingMergeTree(_ingested_at) ORDER BY (model_id, inference_id)")
        # A release with a new enrichment adds its columns; nothing is dropped.
        for name, (ch_type, _) in STORE_COLUMNS.items():
            self.client.command(f"ALTER TABLE {self.table} ADD COLUMN IF NOT EXISTS {quote(name)} {ch_type}")
        self.schema.table_ready = True

    def ensure_view(self, spec: ModelSpec) -> None:
        if self.schema.views.get(spec.model_id) == spec:
            return
        self.ensure_table()
        model = check_model_id(spec.model_id)  # also safe inside the string literal below
        select = ", ".join(f"{expr} AS {quote(name)}" for name, expr in view_columns(spec))
        with self.schema.lock:
            self.client.command(f"CREATE OR REPLACE VIEW {quote(self.database)}.{quote(model)} AS "
                                f"SELECT {select} FROM {self.table} FINAL WHERE model_id = '{model}'")
            self.schema.views[spec.model_id] = spec

    def insert(self, table: pa.Table) -> None:
        """One INSERT; the table must exist (ensure_table/ensure_view ran before, once)."""
        self.client.insert_arrow(self.table, table)


def run_query(client, sql: str, settings: dict | None = None) -> tuple[list[str], list[tuple]]:
    result = client.query(sql, settings=settings)
    return list(result.column_names), [tuple(r) for r in result.result_rows]
