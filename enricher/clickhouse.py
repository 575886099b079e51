"""ClickHouse: connections, the enriched tables, and queries.

One code path for the embedded engine (chDB, `chdb:///PATH`) and a server
(`http(s)://USER:PASSWORD@HOST:PORT/DATABASE`): both go through
clickhouse-connect, only `get_client`'s arguments differ.

Layout, for a database setting `enricher`:

    enricher_store.<model_id>  ReplacingMergeTree ORDER BY inference_id, the rows
                               as written (a redelivered batch adds copies here)
    enricher.<model_id>        VIEW ... FINAL over it: one row per inference_id

At-least-once delivery means a batch may be written twice after a crash; the
copies share `inference_id`, so the view (the documented query surface) shows
each inference once, and background merges drop the copies from storage.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

import clickhouse_connect
import pyarrow as pa

from models import ENRICHMENTS
from models.spec import ModelSpec

from .config import Settings

# Columns every enriched table has besides features, attributes and enrichments.
INTERNAL_COLUMNS = {
    "_ingested_at": ("DateTime64(6, 'UTC')", pa.timestamp("us", tz="UTC")),
    "_partition": ("UInt32", pa.uint32()),
    "_offset": ("UInt64", pa.uint64()),
}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quote(identifier: str) -> str:
    """Quote an identifier for SQL; refuses anything but plain names."""
    if not _IDENT.match(identifier):
        raise ValueError(f"refusing identifier {identifier!r} in SQL: only letters, digits and _ are allowed")
    return f"`{identifier}`"


def connect(settings: Settings, readonly: bool = False):
    """A clickhouse-connect client for the configured URL."""
    url = settings.clickhouse_url
    parts = urlsplit(url)
    extra = {"settings": {"readonly": 2}} if readonly else {}
    if parts.scheme == "chdb":
        path = unquote(parts.netloc + parts.path)
        return clickhouse_connect.get_client(interface="chdb", path=path, **extra)
    password = unquote(parts.password or "") or settings.clickhouse_password or ""
    return clickhouse_connect.get_client(
        interface=parts.scheme, host=parts.hostname, port=parts.port,
        username=unquote(parts.username or "default"), password=password,
        database="default", **extra)


def value_type(kind: str, nullable: bool) -> tuple[str, pa.DataType]:
    if kind == "numeric":
        return ("Nullable(Float64)" if nullable else "Float64"), pa.float64()
    return ("LowCardinality(Nullable(String))" if nullable else "LowCardinality(String)"), pa.string()


def table_columns(spec: ModelSpec) -> dict[str, tuple[str, pa.DataType]]:
    """Every column of a model's enriched table: name -> (ClickHouse type, Arrow type)."""
    cols = {"inference_id": ("String", pa.string()),
            "timestamp": ("DateTime64(3, 'UTC')", pa.timestamp("ms", tz="UTC"))}
    for c in spec.features:
        cols[c.name] = value_type(c.type, nullable=False)
    for c in spec.attributes:
        cols[c.name] = value_type(c.type, nullable=True)
    cols["prediction"] = value_type(spec.prediction_type, nullable=False)
    cols["label"] = value_type(spec.prediction_type, nullable=True)
    for name, enrichment in ENRICHMENTS.items():
        for col, arrow_type in enrichment.output_columns(spec).items():
            cols[col] = (_nullable(arrow_type), arrow_type)
        cols[f"{name}_version"] = ("Nullable(UInt32)", pa.uint32())
    cols.update(INTERNAL_COLUMNS)
    return cols


def _nullable(arrow_type: pa.DataType) -> str:
    mapping = {pa.float64(): "Float64", pa.float32(): "Float32", pa.string(): "String",
               pa.int64(): "Int64", pa.uint32(): "UInt32"}
    if arrow_type not in mapping:
        raise TypeError(f"no ClickHouse type for enrichment column type {arrow_type}")
    return f"Nullable({mapping[arrow_type]})"


class EnrichedTables:
    """Creates (on demand) and writes each model's enriched table."""

    def __init__(self, client, database: str):
        self.client = client
        self.database = database
        self.store = f"{database}_store"
        self._ready: dict[str, dict] = {}
        quote(database), quote(self.store)

    def ensure(self, spec: ModelSpec) -> dict[str, tuple[str, pa.DataType]]:
        cols = table_columns(spec)
        if self._ready.get(spec.model_id) == cols:
            return cols
        db, store, table = quote(self.database), quote(self.store), quote(spec.model_id)
        self.client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
        self.client.command(f"CREATE DATABASE IF NOT EXISTS {store}")
        body = ",\n  ".join(f"{quote(n)} {t}" for n, (t, _) in cols.items())
        self.client.command(
            f"CREATE TABLE IF NOT EXISTS {store}.{table} (\n  {body}\n) "
            "ENGINE = ReplacingMergeTree(_ingested_at) ORDER BY inference_id")
        # A re-registered model may have gained columns: add them, never drop.
        existing = {r[0] for r in self.client.query(
            "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String}",
            parameters={"db": self.store, "t": spec.model_id}).result_rows}
        for name, (ch_type, _) in cols.items():
            if name not in existing:
                if not ch_type.startswith(("Nullable", "LowCardinality(Nullable")):
                    ch_type = f"Nullable({ch_type})" if "LowCardinality" not in ch_type else \
                        "LowCardinality(Nullable(String))"
                self.client.command(f"ALTER TABLE {store}.{table} ADD COLUMN IF NOT EXISTS {quote(name)} {ch_type}")
        self.client.command(f"CREATE OR REPLACE VIEW {db}.{table} AS SELECT * FROM {store}.{table} FINAL")
        self._ready[spec.model_id] = cols
        return cols

    def insert(self, spec: ModelSpec, table: pa.Table) -> None:
        self.ensure(spec)
        self.client.insert_arrow(f"{quote(self.store)}.{quote(spec.model_id)}", table)


def run_query(client, sql: str) -> tuple[list[str], list[tuple]]:
    result = client.query(sql)
    return list(result.column_names), [tuple(r) for r in result.result_rows]
