#!/bin/bash
# Run once by the ClickHouse image on first start: a user for Grafana that may only
# read (readonly=1), and only the enriched tables and the store the views read.
set -euo pipefail
clickhouse client --user "$CLICKHOUSE_USER" --password "$CLICKHOUSE_PASSWORD" --multiquery <<SQL
CREATE USER IF NOT EXISTS grafana IDENTIFIED BY '${GRAFANA_CLICKHOUSE_PASSWORD}' SETTINGS readonly = 1;
GRANT SELECT ON enricher.* TO grafana;
GRANT SELECT ON enricher_store.* TO grafana;
SQL
