"""ClickHouse: the table layout (clickhouse), the sink that writes batches
(sink), late labels and their sweeper (labels), drift in SQL (drift),
migrations between layouts (migrate), and reading: the query guard
(sqlguard), the query runner (queries) and the worker-or-direct reader (query)."""
