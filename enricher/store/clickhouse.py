"""ClickHouse: connections, the enriched tables, and queries.

One code path for the embedded engine (chDB, `chdb:///PATH`) and a server
(`http(s)://USER:PASSWORD@HOST:PORT/DATABASE`): both go through
clickhouse-connect, only `get_client`'s arguments differ.

Layout (v2), for a database setting `enricher`:

    enricher_store.enriched  every model's rows: ReplacingMergeTree(_written_at)
                             PARTITION BY toYYYYMM(timestamp)
                             ORDER BY (model_id, timestamp, inference_id);
                             features in numbered typed columns n0, n1, ...
                             (numeric) and c0, c1, ... (categorical)
    enricher_store.labels    label updates, the latest per inference
                             (ReplacingMergeTree(label_at); labels.py)
    enricher_store.label_sweeps  the label sweep's watermarks (labels.py)
    enricher_store.reference_bins, reference_values   reference profiles (drift.py)
    enricher.<model_id>      VIEW ... FINAL WHERE model_id = '<model_id>': the
                             model's rows, its columns named after its features

Why this layout (measured: benchmarks/layouts.py, then the query section of
`make bench`):
- time in the sort key, right after the model: a query over the last hour or
  day reads that hour or day, not the model's whole history;
- one typed column per slot: a query on one feature reads that feature only
  (a Map column reads every key of every row). Slots, not a column per
  feature name, because one table holds every model's rows, and one insert
  per batch whatever the number of models is what keeps a stream over a
  thousand models as fast as one over a single model (a table per model or
  per feature layout is an insert per model or layout per batch). Which slot
  is which feature is the registry's (models/slots.py), and the view names
  them; a ClickHouse JSON column read as fast but inserted 3x slower;
- ReplacingMergeTree(_written_at): rows with one (model_id, timestamp,
  inference_id) are one row, the last written. A redelivered inference
  collapses with its first copy, and a label update writes its row again with
  the label (labels.py). Measured against CoalescingMergeTree, which would let
  a label be a small row of its own: FINAL over several parts cost up to 8x
  more there (it merges every column's values; Replacing's FINAL only marks
  the rows to skip), on every query of the view; rewriting the few rows a
  label sweep touches is the cheaper side;
- monthly partitions, and FINAL per partition in the view
  (`do_not_merge_across_partitions_select_final`): a row's copies share its
  timestamp, hence its partition, so the view never merges across months; a
  month no row has come for in an hour is merged into one part
  (min_age_to_force_merge_seconds), which FINAL then reads as it is;
- inserts carry a deduplication token made from the batch's offsets (see
  `batch.py`): a retried insert adds nothing to storage. A batch redelivered
  with other boundaries is left to the merge and the view's FINAL;
- retention: `ENRICHER_RETENTION_DAYS` is a TTL on `timestamp` (and on the
  labels' `label_at`).

Layout v1 (`<database>_store.inferences`, before 2026-12) is migrated by
`enricher migrate` (migrate.py).

On a cluster (ENRICHER_CLICKHOUSE_CLUSTER=NAME; `Topology`), each table's
data lives in `<name>_local`, created ON CLUSTER with the Replicated engine of
the same family (replicas deduplicate inserts by default: a retried block is
recognised on any replica), and `<name>` is a Distributed table over them:
reads, inserts and the views use the very names they use on one server. The
sharding key keeps every copy of a row and its label on one shard
(cityHash64(model_id, inference_id)), so FINAL, which each shard applies to its
own rows, still folds them. Inserts wait for every shard
(distributed_foreground_insert), so an acknowledged batch is written, as on
one server. Column changes go to both tables (a Distributed table has its own
column list); deletes and TTLs to the local ones.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import clickhouse_connect
import pyarrow as pa

from enricher.config import Settings
from enricher.models.catalog import model_outputs
from enricher.models.spec import ModelSpec, check_model_id

log = logging.getLogger(__name__)

TABLE = "enriched"
LABELS = "labels"
LABEL_SWEEPS = "label_sweeps"
REFERENCE_BINS = "reference_bins"      # drift.py
REFERENCE_VALUES = "reference_values"
LEGACY_TABLE = "inferences"  # layout v1 (migrate.py)
CONTROL = "control"                    # control_state.py
KEY = ("model_id", "timestamp", "inference_id")
# Enough recent inserts to recognise a retry (a batch every ~0.1-1 s: minutes).
DEDUP_WINDOW = 10_000
# A month no row has arrived for in this long is merged into one part: its
# queries then read one part, and FINAL skips it (one part has no copies to
# fold). The current month keeps ClickHouse's usual merges.
CLOSED_PARTITION_MERGE_S = 3600
_SLOT = re.compile(r"^([nc])(\d+)$")
SLOT_TYPES = {"n": ("Nullable(Float64)", pa.float64()), "c": ("LowCardinality(Nullable(String))", pa.string())}


_CH_TYPES = {pa.float64(): "Float64", pa.float32(): "Float32", pa.string(): "String",
             pa.int64(): "Int64", pa.uint32(): "UInt32"}


def _nullable(arrow_type: pa.DataType) -> str:
    if arrow_type not in _CH_TYPES:
        raise TypeError(f"no ClickHouse type for enrichment column type {arrow_type}")
    return f"Nullable({_CH_TYPES[arrow_type]})"


#: The storage table's own columns (ids, prediction, label, bookkeeping):
#: name -> (ClickHouse type, Arrow type). Slots and enrichment outputs come per model (`spec_columns`).
FIXED_COLUMNS: dict[str, tuple[str, pa.DataType]] = {
    "model_id": ("LowCardinality(String)", pa.string()),
    "timestamp": ("DateTime64(3, 'UTC')", pa.timestamp("ms", tz="UTC")),
    "inference_id": ("String", pa.string()),
    "prediction": ("Nullable(Float64)", pa.float64()),
    "prediction_class": ("LowCardinality(Nullable(String))", pa.string()),
    "label": ("Nullable(Float64)", pa.float64()),
    "label_class": ("LowCardinality(Nullable(String))", pa.string()),
    # When the row's label was set: its own timestamp for a label sent with
    # the inference, the update's arrival for a later one (labels.py).
    "label_at": ("Nullable(DateTime64(6, 'UTC'))", pa.timestamp("us", tz="UTC")),
    "_ingested_at": ("DateTime64(6, 'UTC')", pa.timestamp("us", tz="UTC")),
    "_partition": ("UInt32", pa.uint32()),
    "_offset": ("UInt64", pa.uint64()),
    # This version of the row was written at: the version ReplacingMergeTree
    # keeps (a label sweep's copy is newer than the row it labels).
    "_written_at": ("DateTime64(6, 'UTC')", pa.timestamp("us", tz="UTC")),
}
META_COLUMNS = ("_ingested_at", "_partition", "_offset")  # shown in the views; _written_at is not


@functools.lru_cache(maxsize=8192)
def spec_columns(spec: ModelSpec) -> dict[str, tuple[str, pa.DataType]]:
    """The storage columns a model writes besides FIXED_COLUMNS: its slots, then
    the outputs (and version columns) of every enrichment it can use, as the
    enrichments declare them (enricher.models.catalog.model_outputs). Don't modify
    the result: it is shared."""
    cols = {}
    for storage in spec.storage_columns.values():
        cols[storage] = SLOT_TYPES[_SLOT.match(storage).group(1)]
    for name, outputs in model_outputs(spec):
        for out in outputs:
            if out.storage in FIXED_COLUMNS or out.storage in cols or _SLOT.match(out.storage):
                raise ValueError(f"{name}: output {out.name!r} would be stored in {out.storage!r}, "
                                 "a column already taken")
            cols[out.storage] = (_nullable(out.type), out.type)
    return cols


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quote(identifier: str) -> str:
    """Quote an identifier for SQL; refuses anything but plain names."""
    if not _IDENT.match(identifier):
        raise ValueError(f"refusing identifier {identifier!r} in SQL: only letters, digits and _ are allowed")
    return f"`{identifier}`"


def literal(model_id: str) -> str:
    """A model id as an SQL string literal (a valid id has nothing to escape)."""
    return f"'{check_model_id(model_id)}'"


def connect(settings: Settings, database: str = "default", username: str | None = None,
            password: str | None = None, session_settings: dict | None = None):
    """A clickhouse-connect client for the configured URL. Analyst reads go
    through queries.QueryRunner, which opens one per query with `database`
    current and `session_settings` in its session (on the embedded engine,
    SET on the connection; on a server, sent with every request), or as the
    query user (`username`, `password`) whose settings profile holds them."""
    url = settings.clickhouse_url
    parts = urlsplit(url)
    if parts.scheme == "chdb":
        path = unquote(parts.netloc + parts.path)
        extra = {"database": database} if database != "default" else {}
        return clickhouse_connect.get_client(interface="chdb", path=path, settings=session_settings, **extra)
    # An analyst query may take its own time limit; an insert may not take longer than the store timeout.
    analyst = username is not None or session_settings is not None
    timeout = max(settings.clickhouse_timeout, settings.query_max_seconds + 5) if analyst else settings.clickhouse_timeout
    if username is None:
        username = unquote(parts.username or "default")
        password = unquote(parts.password or "") or settings.clickhouse_password or ""
    if settings.clickhouse_cluster:
        # An insert into a Distributed table returns once every shard has its rows (not
        # queued on this node for later): the batch is acknowledged only when written.
        session_settings = {"distributed_foreground_insert": 1, **(session_settings or {})}
    # A store that accepts and never answers must fail the insert, not hold it forever.
    return clickhouse_connect.get_client(
        interface=parts.scheme, host=parts.hostname, port=parts.port,
        username=username, password=password or "", database=database,
        connect_timeout=min(10.0, settings.clickhouse_timeout),
        send_receive_timeout=timeout,
        settings=session_settings)


def view_columns(spec: ModelSpec) -> list[tuple[str, str]]:
    """The model's view: (column name, SQL expression over the storage table)."""
    cols = [("inference_id", "inference_id"), ("timestamp", "timestamp")]
    slots = spec.storage_columns
    cols += [(c.name, slots[c.name]) for c in spec.columns]
    suffix = "" if spec.prediction_type == "numeric" else "_class"
    cols += [("prediction", f"prediction{suffix}"), ("label", f"label{suffix}"), ("label_at", "label_at")]
    for _, outputs in model_outputs(spec):
        cols += [(out.name, out.storage) for out in outputs]
    cols += [(c, c) for c in META_COLUMNS]
    return cols


class Schema:
    """What DDL has been run: shared by every connection of a process, so
    that the tables, slot columns and views are created once, not once per thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.table_ready = False
        self.columns: set[str] = set()
        self.views: dict[str, ModelSpec] = {}


def store_table(database: str, table: str = TABLE) -> str:
    """A storage table's quoted name for a database setting."""
    return f"{quote(database + '_store')}.{quote(table)}"


def legacy_exists(client, database: str) -> bool:
    """Whether a layout v1 table is still there, unmigrated."""
    return client.query("SELECT count() FROM system.tables WHERE database = {db:String} AND name = {t:String}",
                        parameters={"db": f"{database}_store", "t": LEGACY_TABLE}).result_rows[0][0] > 0


def _ttl(column: str, days: int) -> str:
    return f"TTL toDateTime({column}) + toIntervalDay({int(days)})" if days > 0 else ""


# On a cluster: what keeps the rows one key folds (ReplacingMergeTree) on one shard.
SHARDING = {TABLE: "cityHash64(model_id, inference_id)", LABELS: "cityHash64(model_id, inference_id)",
            LABEL_SWEEPS: "rand()", REFERENCE_BINS: "cityHash64(model_id)", REFERENCE_VALUES: "cityHash64(model_id)",
            CONTROL: "cityHash64(model_id)"}
# Where each replica keeps its table in Keeper: ClickHouse fills the macros ({shard} and
# {replica} from the server's <macros>, {database} and {table} itself).
REPLICA_PATH = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'"


@dataclass(frozen=True)
class Topology:
    """Where the tables live: one server (or the embedded engine), or a cluster.

    `table(name)` is what reads and inserts name (on a cluster, the Distributed
    table); `local(name)` is where the rows are stored (`<name>_local` on a
    cluster), which deletes, TTLs and the replicated engines concern."""

    database: str
    cluster: str = ""

    def __post_init__(self):
        quote(self.database), quote(self.store)
        if self.cluster:
            quote(self.cluster)

    @property
    def store(self) -> str:
        return f"{self.database}_store"

    @property
    def on(self) -> str:
        return f" ON CLUSTER {quote(self.cluster)}" if self.cluster else ""

    def table(self, name: str) -> str:
        return store_table(self.database, name)

    def local(self, name: str) -> str:
        return store_table(self.database, f"{name}_local" if self.cluster else name)

    def local_name(self, name: str) -> str:
        return f"{name}_local" if self.cluster else name

    def engine(self, family: str, *args: str) -> str:
        if self.cluster:
            family, args = f"Replicated{family}", (REPLICA_PATH, *args)
        return f"{family}({', '.join(args)})" if args else family

    @property
    def dedup_window(self) -> str:
        kind = "replicated" if self.cluster else "non_replicated"
        return f"{kind}_deduplication_window = {DEDUP_WINDOW}"

    def create_table(self, name: str, columns: str, engine: str) -> list[str]:
        """CREATE TABLE of `name` (`engine` is what follows ENGINE =), and on a cluster its Distributed table."""
        statements = [f"CREATE TABLE IF NOT EXISTS {self.local(name)}{self.on} (\n  {columns}\n) ENGINE = {engine}"]
        if self.cluster:
            statements.append(
                f"CREATE TABLE IF NOT EXISTS {self.table(name)}{self.on} AS {self.local(name)} ENGINE = "
                f"Distributed('{self.cluster}', '{self.store}', '{self.local_name(name)}', {SHARDING[name]})")
        return statements

    def alter_columns(self, name: str, change: str) -> list[str]:
        """A column change: to the stored table, and on a cluster to its Distributed table too."""
        statements = [f"ALTER TABLE {self.local(name)}{self.on} {change}"]
        if self.cluster:
            statements.append(f"ALTER TABLE {self.table(name)}{self.on} {change}")
        return statements

    def databases(self) -> list[str]:
        return [f"CREATE DATABASE IF NOT EXISTS {quote(db)}{self.on}" for db in (self.database, self.store)]


def store_ddl(topology: Topology, retention_days: int = 0) -> list[str]:
    """Every storage table of the layout, as CREATE statements (run by the worker on first
    use; `enricher schema` prints them for a DBA). Models' views come with their models."""
    t = topology
    body = ",\n  ".join(f"{quote(n)} {typ}" for n, (typ, _) in FIXED_COLUMNS.items())
    # The bloom filter finds a label's row without its timestamp (labels.py);
    # the minmax index finds the rows ingested since a label sweep.
    statements = t.databases()
    statements += t.create_table(
        TABLE, f"{body},\n  INDEX inference_id_bloom inference_id TYPE bloom_filter(0.01) GRANULARITY 1,\n"
               "  INDEX ingested_at_minmax _ingested_at TYPE minmax GRANULARITY 1",
        f"{t.engine('ReplacingMergeTree', '_written_at')} PARTITION BY toYYYYMM(timestamp) "
        f"ORDER BY ({', '.join(KEY)}) {_ttl('timestamp', retention_days)} "
        f"SETTINGS {t.dedup_window}, min_age_to_force_merge_seconds = {CLOSED_PARTITION_MERGE_S}, "
        "min_age_to_force_merge_on_partition_only = 1")
    statements += t.create_table(
        LABELS, "model_id LowCardinality(String), inference_id String, label Nullable(Float64),\n"
                "  label_class LowCardinality(Nullable(String)), label_at DateTime64(6, 'UTC'),\n"
                "  INDEX label_at_minmax label_at TYPE minmax GRANULARITY 1",
        f"{t.engine('ReplacingMergeTree', 'label_at')} ORDER BY (model_id, inference_id) "
        f"{_ttl('label_at', retention_days)} SETTINGS {t.dedup_window}")
    statements += t.create_table(
        LABEL_SWEEPS, "started_at DateTime64(6, 'UTC'), applied UInt64, pending UInt64",
        f"{t.engine('MergeTree')} ORDER BY started_at {_ttl('started_at', 30)}")
    statements += t.create_table(
        REFERENCE_BINS, "model_id LowCardinality(String), reference String, feature String, "
                        "kind LowCardinality(String),\n  bin UInt16, lower Nullable(Float64), upper Nullable(Float64), "
                        "category Nullable(String),\n  count UInt64, written_at DateTime64(6, 'UTC') DEFAULT now64(6)",
        f"{t.engine('ReplacingMergeTree')} ORDER BY (model_id, reference, feature, bin) SETTINGS {t.dedup_window}")
    statements += t.create_table(
        REFERENCE_VALUES, "model_id LowCardinality(String), reference String, feature LowCardinality(String),\n"
                          "  value Float64",
        f"{t.engine('MergeTree')} ORDER BY (model_id, reference, feature, value) SETTINGS {t.dedup_window}")
    return statements + control_ddl(topology)


def control_ddl(topology: Topology) -> list[str]:
    """The control state's table (control_state.py): the latest value per (model, key) wins."""
    return topology.create_table(
        CONTROL, "model_id String, key String, value String, written_at DateTime64(6, 'UTC'), writer String",
        f"{topology.engine('ReplacingMergeTree', 'written_at')} ORDER BY (model_id, key)")


def view_ddl(topology: Topology, spec: ModelSpec) -> str:
    """A model's view: its rows from the (on a cluster, Distributed) storage table, columns named."""
    select = ", ".join(f"{quote(expr)} AS {quote(name)}" for name, expr in view_columns(spec))
    # FINAL per partition: a row's copies and its label rows share its
    # partition (see the module doc), so no merge across months. The
    # model is a PREWHERE: read before the merge, so FINAL merges this
    # model's rows only, not every model's of the ranges it reads
    # (measured: 4x on a table of 20 models). Safe before the merge, as
    # model_id is part of the key: every copy of a row has the same.
    return (f"CREATE OR REPLACE VIEW {quote(topology.database)}.{quote(check_model_id(spec.model_id))}{topology.on} "
            f"AS SELECT {select} FROM {topology.table(TABLE)} FINAL PREWHERE model_id = {literal(spec.model_id)} "
            "SETTINGS do_not_merge_across_partitions_select_final = 1")


def schema_ddl(topology: Topology, retention_days: int, specs: list[ModelSpec]) -> list[str]:
    """All of it, for a DBA (`enricher schema`): the tables, then each model's columns and view,
    as the worker would run them on first use (it runs them anyway: IF NOT EXISTS)."""
    statements = store_ddl(topology, retention_days)
    added: set[str] = set(FIXED_COLUMNS)
    for spec in specs:
        for name, (ch_type, _) in spec_columns(spec).items():
            if name not in added:
                statements += topology.alter_columns(TABLE, f"ADD COLUMN IF NOT EXISTS {quote(name)} {ch_type}")
                added.add(name)
        statements.append(view_ddl(topology, spec))
    return statements


class EnrichedTables:
    """Creates (on demand) the storage tables, slot columns and each model's view, and writes batches."""

    def __init__(self, client, database: str, schema: Schema | None = None, retention_days: int = 0,
                 cluster: str = ""):
        self.client = client
        self.database = database
        self.topology = Topology(database, cluster)
        self.store = self.topology.store
        self.schema = schema or Schema()
        self.retention_days = retention_days

    @classmethod
    def from_settings(cls, client, settings: Settings, schema: Schema | None = None) -> "EnrichedTables":
        return cls(client, settings.clickhouse_database, schema, settings.retention_days,
                   settings.clickhouse_cluster)

    @property
    def table(self) -> str:
        return self.topology.table(TABLE)

    @property
    def labels(self) -> str:
        return self.topology.table(LABELS)

    def view(self, model_id: str) -> str:
        return f"{quote(self.database)}.{quote(check_model_id(model_id))}"

    def ensure_table(self) -> None:
        if self.schema.table_ready:
            return
        with self.schema.lock:
            if not self.schema.table_ready:
                self._create_tables()

    def _create_tables(self) -> None:
        c = self.client
        for statement in store_ddl(self.topology, self.retention_days):
            c.command(statement)
        existing = {r[0] for r in c.query(
            "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String}",
            parameters={"db": self.store, "t": self.topology.local_name(TABLE)}).result_rows}
        # A release with new columns of its own adds them; nothing is dropped.
        # (An enrichment's columns are added when a model first needs them.)
        for name, (ch_type, _) in FIXED_COLUMNS.items():
            if name not in existing:
                for statement in self.topology.alter_columns(TABLE, f"ADD COLUMN IF NOT EXISTS {quote(name)} {ch_type}"):
                    c.command(statement)
                existing.add(name)
        self._apply_retention(TABLE, "timestamp", self.retention_days)
        self._apply_retention(LABELS, "label_at", self.retention_days)
        self.schema.columns = existing
        self.schema.table_ready = True
        if legacy_exists(c, self.database):
            log.warning("%s (layout v1, an earlier release) is still there: its rows are not in the models' "
                        "views until you run `enricher migrate`", store_table(self.database, LEGACY_TABLE))

    def _apply_retention(self, table: str, column: str, days: int) -> None:
        """The TTL the settings ask for, on a table made under other settings."""
        engine = self.client.query("SELECT engine_full FROM system.tables WHERE database = {db:String} "
                                   "AND name = {t:String}",
                                   parameters={"db": self.store, "t": self.topology.local_name(table)}
                                   ).result_rows[0][0]
        current = re.search(r"TTL toDateTime\(\w+\) \+ toIntervalDay\((\d+)\)", engine)
        if (int(current.group(1)) if current else 0) == days:
            return
        change = f"MODIFY {_ttl(column, days)}" if days > 0 else "REMOVE TTL"
        self.client.command(f"ALTER TABLE {self.topology.local(table)}{self.topology.on} {change}")

    def ensure_columns(self, columns: dict[str, tuple[str, pa.DataType]]) -> None:
        """Columns a model needs (slots n7, c2, ..., an enrichment's outputs): added on
        first use, a metadata-only change. `columns`: name -> (ClickHouse type, Arrow type)."""
        self.ensure_table()
        missing = [n for n in columns if n not in self.schema.columns]
        if not missing:
            return
        with self.schema.lock:
            for name in missing:
                if name not in self.schema.columns:
                    for statement in self.topology.alter_columns(
                            TABLE, f"ADD COLUMN IF NOT EXISTS {quote(name)} {columns[name][0]}"):
                        self.client.command(statement)
                    self.schema.columns.add(name)

    def ensure_view(self, spec: ModelSpec) -> None:
        if self.schema.views.get(spec.model_id) == spec:
            return
        self.ensure_columns(spec_columns(spec))
        with self.schema.lock:
            if self.schema.views.get(spec.model_id) != spec:  # another thread may have made it meanwhile
                self.client.command(view_ddl(self.topology, spec))
                self.schema.views[spec.model_id] = spec

    def insert(self, table: pa.Table, token: str | None = None) -> None:
        """One INSERT; the table and columns must exist (ensure_view ran before, once).

        `token` identifies the batch: an insert with a token already seen among the
        last DEDUP_WINDOW inserts adds nothing (a retry of the same batch)."""
        self.client.insert_arrow(self.table, table,
                                 settings={"insert_deduplication_token": token} if token else None)

    def insert_labels(self, table: pa.Table, token: str | None = None) -> None:
        """One INSERT of label updates (labels.label_table), deduplicated like `insert`."""
        self.ensure_table()
        self.client.insert_arrow(self.labels, table,
                                 settings={"insert_deduplication_token": token} if token else None)

    def drop_model(self, model_id: str) -> None:
        """Delete a model's rows, labels and view (waits for the deletion to be done)."""
        self.ensure_table()
        where = f"WHERE model_id = {literal(model_id)}"
        on = self.topology.on
        self.client.command(f"DROP VIEW IF EXISTS {self.view(model_id)}{on}")
        for table in (TABLE, LABELS):
            self.client.command(f"ALTER TABLE {self.topology.local(table)}{on} DELETE {where} "
                                "SETTINGS mutations_sync = 2")
        self.schema.views.pop(model_id, None)


def drop_model_rows(settings: Settings, model_id: str) -> None:
    """Delete a model's enriched rows, labels and view, on a connection of its own
    (DELETE /models/{id}/rows, `enricher models drop-rows`); its registration stays."""
    tables = EnrichedTables.from_settings(connect(settings), settings)
    try:
        tables.drop_model(model_id)
    finally:
        tables.client.close()
