"""From layout v1 to v2: `enricher migrate`.

Layout v1 (releases before 2026-12) kept every model's rows in
`<database>_store.inferences`, a ReplacingMergeTree ordered by
(model_id, inference_id) with the features in two Map columns. Layout v2 is
`<database>_store.enriched` (clickhouse.py). A worker of this release writes
v2 only and warns at start while a v1 table is still there; its rows are not
in the models' views until migrated.

The migration copies, per model, the rows v1's view showed (`FINAL`: each
inference once, its last copy) into v2, each feature from its map into the
model's slot column. It then checks that every inference of v1 is in the
model's v2 view, and only when every model checked out it renames v1 to
`inferences_v1` (or drops it, with `--drop-legacy`). It is safe to run
again: a copy written twice is one row in v2 (same key). Rows of a model
that is no longer registered stay in v1, which is then kept (the command says
which models).

Values a v1 map held for a column no longer in the model's schema are not
copied (v1's view did not show them either).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from enricher.errors import EnricherError
from enricher.models.registry import ModelRegistry, UnknownModel
from enricher.store.clickhouse import (
    FIXED_COLUMNS,
    KEY,
    LEGACY_TABLE,
    EnrichedTables,
    legacy_exists,
    literal,
    quote,
    spec_columns,
    store_table,
)

log = logging.getLogger(__name__)

MIGRATED_TABLE = "inferences_v1"


class MigrationError(EnricherError, RuntimeError):
    pass


@dataclass
class MigrationReport:
    found: bool = False
    rows: dict[str, int] = field(default_factory=dict)  # model -> inferences copied
    unregistered: list[str] = field(default_factory=list)
    legacy: str = ""  # what became of the v1 table: "renamed", "dropped", "kept"


def migrate(tables: EnrichedTables, registry: ModelRegistry, drop_legacy: bool = False) -> MigrationReport:
    client, report = tables.client, MigrationReport()
    if not legacy_exists(client, tables.database):
        return report
    report.found = True
    legacy = store_table(tables.database, LEGACY_TABLE)
    legacy_cols = {r[0] for r in client.query(
        "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String}",
        parameters={"db": tables.store, "t": LEGACY_TABLE}).result_rows}
    models = [r[0] for r in client.query(f"SELECT DISTINCT model_id FROM {legacy} ORDER BY model_id").result_rows]
    tables.ensure_table()
    for model_id in models:
        try:
            spec = registry.get(model_id)
        except UnknownModel:
            report.unregistered.append(model_id)
            continue
        tables.ensure_view(spec)
        select = {k: quote(k) for k in KEY}
        for c in spec.columns:
            select[spec.storage_columns[c.name]] = f"{'numeric' if c.numeric else 'categorical'}['{c.name}']"
        for name in [*FIXED_COLUMNS, *spec_columns(spec)]:  # enrichment columns: v1 stored them by the same names
            if name in legacy_cols and name not in select:
                select[name] = quote(name)
        # v1 had no label_at: a label there came with its inference, so it is as old as it.
        select["label_at"] = "if(label IS NULL AND label_class IS NULL, NULL, toDateTime64(timestamp, 6, 'UTC'))"
        select["_written_at"] = quote("_ingested_at")
        where = f"WHERE model_id = {literal(model_id)}"
        client.command(f"INSERT INTO {tables.table} ({', '.join(quote(n) for n in select)}) "
                       f"SELECT {', '.join(f'{expr} AS {quote(n)}' for n, expr in select.items())} "
                       f"FROM {legacy} FINAL {where}")
        expected = client.query(f"SELECT count() FROM {legacy} FINAL {where}").result_rows[0][0]
        missing = client.query(f"SELECT count() FROM {legacy} FINAL {where} AND inference_id NOT IN "
                               f"(SELECT inference_id FROM {tables.view(model_id)})").result_rows[0][0]
        if missing:
            raise MigrationError(f"model {model_id}: {missing} of {expected} v1 rows are not in the v2 view "
                                 f"after copying; {legacy} is left as it is")
        report.rows[model_id] = expected
        log.info("model %s: %d rows copied from layout v1", model_id, expected)
    if report.unregistered:
        report.legacy = "kept"
    elif drop_legacy:
        client.command(f"DROP TABLE {legacy}")
        report.legacy = "dropped"
    else:
        client.command(f"RENAME TABLE {legacy} TO {store_table(tables.database, MIGRATED_TABLE)}")
        report.legacy = "renamed"
    return report
