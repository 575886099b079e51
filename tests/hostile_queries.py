"""A corpus of attempts to make /query do more than read the enriched tables.

Each entry is a statement an attacker holding the API token might send. The
forms are those that escaped the guard of the past (a second SQL parser that
read ClickHouse's Unicode quotes differently), spread over every quote and
dash character ClickHouse's lexer knows, comments in every position,
heredocs, CTEs in and out of scope, membership and joins over other tables,
table functions in every clause, SETTINGS / FORMAT / INTO OUTFILE after every
set operator, and several statements in one request.

`{canary}` is a file holding a secret, `{out}` a path nothing may create,
`{port}` a loopback listener that counts connections, `{model}` a model's view.
"""

from __future__ import annotations

import itertools

# (opening, closing) string quotes: ASCII, the typographic ones ClickHouse's lexer
# reads as string quotes, and mixtures that confused the old guard.
STRING_QUOTES = [("'", "'"), ("\u2018", "\u2019"), ("\u2018", "'"), ("'", "\u2019")]
# Identifier quotes: backquote, double quote, and the typographic double quotes.
IDENT_QUOTES = [("`", "`"), ('"', '"'), ("\u201c", "\u201d")]
# Characters a lexer may take for white space or a dash (comments start with two dashes).
SPACES = [" ", "\u00a0", "\u2003", "\u3000", "\u200b", "\ufeff", "\u2028", "\t", "\n"]
DASHES = ["--", "\u2013\u2013", "\u2014\u2014", "\u2212\u2212", "#!", "# ", "//"]

SOURCES = [
    "file({q}{canary}{p}, LineAsString)",
    "file({q}/proc/self/environ{p}, RawBLOB)",
    "url({q}http://127.0.0.1:{port}/x{p}, CSV, {q}a String{p})",
    "s3({q}http://127.0.0.1:{port}/b/k.csv{p})",
    "remote({q}127.0.0.1:{port}{p}, system.one)",
    "mysql({q}127.0.0.1:{port}{p}, {q}d{p}, {q}t{p}, {q}u{p}, {q}p{p})",
    "postgresql({q}127.0.0.1:{port}{p}, {q}d{p}, {q}t{p}, {q}u{p}, {q}p{p})",
    "executable({q}cat {canary}{p}, CSV, {q}a String{p})",
    "system.users",
    "system.settings",
    "enricher_store.label_sweeps",
    "default.t",
    "{i}system{j}.{i}one{j}",
]

SET_OPERATORS = ["UNION ALL", "UNION DISTINCT", "INTERSECT", "EXCEPT"]
TRAILERS = ["SETTINGS max_execution_time = 0", "SETTINGS max_result_rows = 0, readonly = 0",
            "SETTINGS max_memory_usage = 0", "FORMAT JSON", "INTO OUTFILE {q}{out}{p}",
            "FORMAT Template SETTINGS format_template_resultset = {q}{canary}{p}"]


def _fill(template: str, q: str, p: str, i: str = "`", j: str = "`", **names) -> str:
    return template.replace("{q}", q).replace("{p}", p).replace("{i}", i).replace("{j}", j).format(**names)


def corpus(canary: str, out: str, port: int, model: str) -> list[str]:
    names = dict(canary=canary, out=out, port=port, model=model)
    attempts: list[str] = []
    for (q, p), (i, j) in itertools.product(STRING_QUOTES, IDENT_QUOTES):
        fill = lambda t: _fill(t, q, p, i, j, **names)  # noqa: E731
        # the escape that was found: a comparison to one parser, a file read to the other
        attempts.append(fill("SELECT {q} = 'y{p} AS a, line FROM file({q}{canary}{p}, LineAsString) "
                             "WHERE line != {q}z' OR {p}"))
        attempts += [
            fill("SELECT {i}file{j}({q}{canary}{p})"),
            fill("SELECT * FROM {i}file{j}({q}{canary}{p}, LineAsString)"),
            fill("SELECT 1; INSERT INTO FUNCTION file({q}{out}{p}, CSV) SELECT 1"),
            fill("SELECT {q};{p}; INSERT INTO FUNCTION file({q}{out}{p}, CSV) SELECT 1"),
            fill("SELECT {q}x' ; DROP TABLE enricher.{model} ; SELECT 'y{p}"),
            fill("SELECT 1; CREATE TABLE enricher.pwn (a Int8) ENGINE = Memory"),
            fill("SELECT 1; DROP TABLE enricher.{model}"),
            fill("INSERT INTO FUNCTION file({q}{out}{p}, CSV) SELECT 1"),
            fill("SELECT 1 INTO OUTFILE {q}{out}{p}"),
            fill("SELECT dictGet({q}d{p}, {q}x{p}, 1)"),
            fill("SELECT getSetting({q}max_execution_time{p})"),
            fill("SELECT file({q}{canary}{p})"),
            fill("SELECT arrayMap(x -> file({q}{canary}{p}), [1])"),
            fill("SELECT * APPLY(file) FROM enricher.{model}"),
            fill("SELECT {q}{canary}{p} AS f, * FROM file(f)"),
        ]
        # every source in every clause, with plain and typographic quotes (the rest of the
        # quote pairs go through the forms below)
        if (q, p, i, j) not in (("'", "'", "`", "`"), ("\u2018", "\u2019", "\u201c", "\u201d")):
            continue
        for source in SOURCES:
            src = fill(source)
            attempts += [
                f"SELECT * FROM {src}",
                f"SELECT count() FROM enricher.{model} WHERE inference_id IN (SELECT * FROM {src})",
                f"SELECT count() FROM enricher.{model} AS a JOIN {src} AS b USING (inference_id)",
                f"SELECT (SELECT count() FROM {src}) AS c",
                f"WITH t AS (SELECT * FROM {src}) SELECT * FROM t",
                f"SELECT * FROM enricher.{model} WHERE 1 IN {src}",
                f"SELECT * FROM enricher.{model} WHERE 1 GLOBAL IN {src}",
                f"SELECT 1 UNION ALL SELECT count() FROM {src}",
            ]
        for op, trailer in itertools.product(SET_OPERATORS, TRAILERS):
            attempts.append(f"SELECT 1 {op} SELECT 1 " + fill(trailer))
            attempts.append(f"SELECT count() FROM enricher.{model} {op} SELECT 2 " + fill(trailer))
    # comments and odd white space in every position of a statement that reads a file
    words = ["SELECT", "*", "FROM", f"file('{canary}',", "LineAsString)"]
    for dash, space in itertools.product(DASHES, SPACES):
        for k in (0, 2, len(words)):
            attempts.append(space.join(words[:k] + [f"{dash} c\n"] + words[k:]))
    for k in range(len(words) + 1):
        attempts.append(" ".join(words[:k] + ["/* c /* nested */ */"] + words[k:]))
    # heredocs as strings, and a heredoc that swallows a statement separator
    attempts += [f"SELECT * FROM file($${canary}$$, LineAsString)",
                 f"SELECT * FROM file($x${canary}$x$, LineAsString)",
                 f"SELECT $a$; INSERT INTO FUNCTION file('{out}', CSV) SELECT 1; $a$",
                 "SELECT $$a$$; SELECT 1"]
    # CTE names out of scope, or named like other databases' tables
    attempts += ["SELECT * FROM (WITH t AS (SELECT 1) SELECT 1) AS s, t",
                 "WITH `system.one` AS (SELECT 1) SELECT * FROM system.one",
                 "SELECT * FROM `system.one`", "SELECT * FROM users",
                 # chDB can read a Python object by its variable name: names of the worker's own variables
                 "SELECT * FROM settings", "SELECT * FROM params", "SELECT * FROM self", "SELECT * FROM sql",
                 "SELECT * FROM os.environ",
                 "WITH x AS (SELECT * FROM system.numbers) SELECT * FROM x LIMIT 1"]
    # membership over other tables, which the engine reads as tables
    attempts += ["SELECT 1 IN system.numbers", "SELECT 1 IN system.one", "SELECT 1 NOT IN default.t",
                 f"SELECT count() FROM enricher.{model} AS a ALL INNER JOIN system.one AS o ON 1 = 1",
                 f"SELECT count() FROM enricher.{model} ARRAY JOIN (SELECT groupArray(name) FROM system.tables) AS n"]
    return list(dict.fromkeys(attempts))
