"""What a query through `/query` or `enricher query` may do: read the enriched tables, nothing else.

ClickHouse's own `readonly` is no confinement in the embedded engine (in
chDB 4.4 a query under `readonly=2` still reads `file('/etc/passwd')`,
reaches `url(...)` and runs `INSERT INTO FUNCTION file(...)`), and a server
honours it only as far as its users and grants are set up. So every query is
checked here first, the same way for both, with sqlglot's ClickHouse parser:

- one statement: a SELECT (with WITH, UNION, subqueries, joins), or
  DESCRIBE of a table;
- every table it reads is a model's view in the enriched database, the
  storage tables in `<database>_store` (`enriched`, `labels`), or a name the query itself
  defines (WITH); no table functions (`file`, `url`, `s3`, `remote`,
  `executable`, `Python`, `input`, `merge`, `numbers`...), no other database
  (`system`, `default`, ...);
- every function it calls is on an allow-list of functions that compute on
  values (arithmetic, comparisons, dates, strings, arrays, aggregates and
  their combinators); a function that reaches files, dictionaries, URLs,
  other servers, settings or the process is not on it;
- no SETTINGS, FORMAT or INTO OUTFILE clause.

Then it runs with a time limit and a result-size limit (and, on a server,
`readonly=2`, so the server refuses writes too).
"""

from __future__ import annotations

import logging
import re

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType


# sqlglot warns when it falls back to a raw Command (SHOW, SYSTEM, ...): those are refused anyway.
logging.getLogger("sqlglot").setLevel(logging.ERROR)


class QueryRefused(ValueError):
    """A query the endpoint will not run; the message says what to change."""


# ClickHouse functions a query may call, lower-cased. Aggregates also take
# the combinators below (countIf, uniqExactIf, quantilesState, ...).
ALLOWED_FUNCTIONS = frozenset(f.lower() for f in """
    abs acos asin atan atan2 cbrt ceil ceiling cos cosh degrees e erf exp exp10 exp2 floor intdiv
    intdivorzero ln log log10 log1p log2 modulo moduloorzero negate pi pow power radians round
    roundbankers roundtoexp2 sign sin sinh sqrt tan tanh trunc truncate plus minus multiply divide
    greatest least if multiif coalesce ifnull isnull isnotnull nullif assumenotnull tonullable isfinite
    isinfinite isnan equals notequals less greater lessorequals greaterorequals and or not xor in notin
    cast tostring tofixedstring tofloat32 tofloat64 toint8 toint16 toint32 toint64 touint8 touint16
    touint32 touint64 todecimal32 todecimal64 tofloat64ornull tofloat64orzero toint64ornull touint32ornull
    todate todate32 todatetime todatetime64 todateornull todatetimeornull totypename tobool
    now now64 today yesterday todayofweek todayofmonth todayofyear tohour tominute tosecond tomonth
    toyear toquarter toweek toisoweek toyearweek tostartofyear tostartofquarter tostartofmonth
    tostartofweek tomonday tostartofday tostartofhour tostartofminute tostartofsecond
    tostartoffiveminutes tostartoftenminutes tostartoffifteenminutes tostartofinterval totime
    tounixtimestamp tounixtimestamp64milli tounixtimestamp64micro tounixtimestamp64nano fromunixtimestamp fromunixtimestamp64milli formatdatetime
    parsedatetimebesteffort parsedatetimebesteffortornull parsedatetime64besteffort datediff date_diff
    dateadd date_add datesub date_sub timestampadd timestampsub datetrunc date_trunc toyyyymm
    toyyyymmdd toyyyymmddhhmmss addseconds addminutes addhours adddays addweeks addmonths addyears
    subtractseconds subtractminutes subtracthours subtractdays subtractweeks subtractmonths
    subtractyears tointervalsecond tointervalminute tointervalhour tointervalday tointervalweek
    tointervalmonth tointervalyear timeslot timeslots
    length lengthutf8 empty notempty lower upper lowerutf8 upperutf8 reverse concat concatws substring
    substr substringutf8 left right trim trimleft trimright ltrim rtrim startswith endswith position
    positioncaseinsensitive locate like notlike ilike notilike match extract extractall replaceone
    replaceall replaceregexpone replaceregexpall splitbychar splitbystring splitbyregexp
    arraystringconcat format lpad rpad repeat leftpad rightpad base64encode base64decode hex unhex
    tovalidutf8 countsubstrings
    array arrayjoin arrayconcat arrayelement has hasall hasany indexof countequal arraycount arraysum
    arrayavg arraymin arraymax arraymap arrayfilter arraysort arrayreversesort arraydistinct arrayuniq
    arrayslice arrayreverse arrayenumerate arrayzip arrayflatten arrayreduce arraycumsum arraypushback
    arraypushfront arrayresize arrayfirst arraylast arrayexists arrayall range emptyarrayfloat64
    emptyarraystring tuple tupleelement untuple mapkeys mapvalues mapcontains map
    count sum avg min max any anylast anyheavy argmin argmax uniq uniqexact uniqcombined uniqhll12
    uniqtheta median quantile quantiles quantileexact quantilesexact quantiletdigest quantilestdigest
    quantiletiming quantiletimingweighted quantileexactweighted quantileinterpolatedweighted
    quantiledeterministic quantilebfloat16 stddevpop stddevsamp stddev varpop varsamp variance covarpop
    covarsamp corr grouparray groupuniqarray grouparraysorted grouparraysample groupbitand groupbitor
    groupbitxor topk topkweighted histogram summap minmap maxmap sumwithoverflow sumkahan avgweighted
    entropy skewpop skewsamp kurtpop kurtsamp simplelinearregression stochasticlinearregression
    mannwhitneyutest studentttest welchttest kolmogorovsmirnovtest meanztest boundingratio
    rankcorr contingency cramersv theilsu first_value last_value row_number rank dense_rank
    percent_rank cume_dist ntile lag lead lagInFrame leadInFrame nth_value
    bar formatreadablesize formatreadablequantity formatreadabletimedelta widthbucket
    sipHash64 cityhash64 xxhash64 murmurhash3_64 farmhash64 javahash halfmd5 md5 sha256 rand rand64
    randcanonical generateuuidv4 touuid
""".split())
COMBINATORS = ("If", "Array", "Map", "Distinct", "OrNull", "OrDefault", "Merge", "MergeState", "State",
               "SimpleState", "ForEach", "Resample", "ArgMin", "ArgMax")
# Keywords that may stand before "(" without being a function call.
_NOT_CALLS = {TokenType.IN, TokenType.ALIAS, TokenType.USING, TokenType.OVER, TokenType.FROM, TokenType.JOIN,
              TokenType.ON, TokenType.EXISTS, TokenType.AND, TokenType.OR, TokenType.NOT, TokenType.SELECT,
              TokenType.WHERE, TokenType.WHEN, TokenType.THEN, TokenType.ELSE, TokenType.WITH,
              TokenType.VALUES, TokenType.ALL, TokenType.DISTINCT, TokenType.COMMA, TokenType.L_PAREN,
              TokenType.GROUP_BY, TokenType.ORDER_BY, TokenType.PARTITION_BY, TokenType.HAVING,
              TokenType.UNION, TokenType.EXCEPT, TokenType.INTERSECT, TokenType.LIMIT, TokenType.CASE,
              TokenType.IS, TokenType.LIKE, TokenType.ILIKE, TokenType.BETWEEN}
_ALLOWED_ROOTS = (exp.Select, exp.Union, exp.Intersect, exp.Except, exp.Subquery, exp.Describe)
_SQL_STRING_LIMIT = 100_000


def _base(name: str) -> str:
    """An aggregate's name without its combinators (uniqExactIf -> uniqExact)."""
    stripped = True
    while stripped:
        stripped = False
        for suffix in COMBINATORS:
            if name.endswith(suffix) and len(name) > len(suffix):
                name, stripped = name[: -len(suffix)], True
                break
    return name


def _function_allowed(name: str) -> bool:
    return name.lower() in ALLOWED_FUNCTIONS or _base(name).lower() in ALLOWED_FUNCTIONS


def check(sql: str, database: str) -> str:
    """The query, if it only reads the enriched tables; QueryRefused (saying why) if not."""
    if not isinstance(sql, str) or not sql.strip():
        raise QueryRefused("give one SELECT statement")
    if len(sql) > _SQL_STRING_LIMIT:
        raise QueryRefused(f"the query is {len(sql):,} characters; the limit is {_SQL_STRING_LIMIT:,}")
    try:
        statements = [s for s in sqlglot.parse(sql, read="clickhouse") if s is not None]
        tokens = sqlglot.tokenize(sql, read="clickhouse")
    except (ParseError, TokenError) as exc:
        raise QueryRefused(f"cannot read the query ({str(exc).splitlines()[0]}); only SELECT statements "
                           "over the enriched tables are allowed") from None
    except RecursionError:
        raise QueryRefused("the query is nested too deeply") from None
    if len(statements) != 1:
        raise QueryRefused(f"give exactly one statement, not {len(statements)}")
    tree = statements[0]
    if not isinstance(tree, _ALLOWED_ROOTS):
        kind = tree.key.upper() if isinstance(tree, exp.Expression) else type(tree).__name__
        raise QueryRefused(f"only SELECT (and DESCRIBE) statements are allowed, not {kind}")
    allowed_dbs = {database, f"{database}_store"}
    defined = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    for node in tree.walk():
        if isinstance(node, (exp.Insert, exp.Create, exp.Drop, exp.Alter, exp.Delete, exp.Update,
                             exp.Command, exp.Set, exp.Use)):
            raise QueryRefused(f"{node.key.upper()} is not allowed: the query endpoint only reads")
        if isinstance(node, exp.Select):
            for clause in ("settings", "format"):
                if node.args.get(clause):
                    raise QueryRefused(f"a {clause.upper()} clause is not allowed (the limits are the "
                                       "endpoint's: ENRICHER_QUERY_MAX_SECONDS, ENRICHER_QUERY_MAX_ROWS)")
        if isinstance(node, exp.Table):
            _check_table(node, allowed_dbs, defined, database)
    for before, token in zip(tokens, tokens[1:]):
        if token.token_type == TokenType.L_PAREN and before.token_type not in _NOT_CALLS \
                and re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", before.text) and not _function_allowed(before.text):
            raise QueryRefused(f"function {before.text}() is not allowed here: the query endpoint computes on "
                               "the enriched tables' values only (no files, URLs, dictionaries, other "
                               "servers, settings or process functions)")
    return sql


def _check_table(node: exp.Table, allowed_dbs: set[str], defined: set[str], database: str) -> None:
    if not isinstance(node.this, exp.Identifier):
        name = node.this.name if isinstance(node.this, exp.Func) and node.this.name else node.this.sql()
        raise QueryRefused(f"table function {name}() is not allowed: read {database}.<model_id> or "
                           f"{database}_store.enriched")
    if node.catalog:
        raise QueryRefused(f"{node.sql(dialect='clickhouse')}: only {database}.<model_id> can be read")
    if not node.db:
        if node.name in defined:
            return
        raise QueryRefused(f"table {node.name!r}: name it with its database, e.g. {database}.{node.name} "
                           f"(only {database} and {database}_store can be read)")
    if node.db not in allowed_dbs:
        raise QueryRefused(f"database {node.db!r} is not readable here: only {database} (one view per model) "
                           f"and {database}_store")


def limits(settings, server: bool) -> dict:
    """ClickHouse settings every checked query runs with."""
    out = {"max_execution_time": settings.query_max_seconds, "max_result_rows": settings.query_max_rows,
           "result_overflow_mode": "throw"}
    if server:
        out["readonly"] = 2  # a server refuses writes too; chDB does not honour it (see above)
    return out
