"""What a query through `/query` or `enricher query` may do: read the enriched tables, nothing else.

Decided on what the engine itself will run, never on a second reading of the
caller's text (a guard with its own SQL parser was escaped by the quotes and
dashes ClickHouse's lexer reads differently; see docs/reliability.md):

1. The engine's own parser makes the caller's text canonical:
   `formatQuerySingleLine` with the text as a query *parameter* parses it
   without running it, refuses several statements, and prints the one
   statement in canonical ASCII form (comments gone, every quote and
   heredoc rewritten). The caller's text is never run.
2. The canonical SELECT is wrapped as `SELECT * FROM (<canonical>) LIMIT
   <row limit + 1>`: the engine stops at the limit, however many rows one
   block holds, and the extra row tells us the answer was cut. A DESCRIBE is
   run as it is.
3. The engine's parser shows us its tree of exactly that wrapped text
   (`EXPLAIN AST`, after `formatQuerySingleLine` has said the EXPLAIN is one
   statement), and the tree is allow-listed: node kinds of a read only
   (no SETTINGS, FORMAT, INTO OUTFILE, query parameters, APPLY); table
   references only to the models' views (`<database>.<model_id>`) and the
   storage tables they, labels and drift reports read; no table function; a
   name without a database only as a name the engine looks up in the views'
   database (the session's current database, see queries.py); `IN` only over
   values or a subquery, not a table's name; every function on an
   allow-list of functions that compute on values.
4. That same wrapped text is what runs, on a fresh connection whose session
   carries the limits (queries.py): nothing is normalised in between.

The allow-list reads the engine's tree dump, whose names are printed raw. A
name that prints like an allowed one but is not (a quoted name holding a dot,
a space or a newline) is a name the engine will not find when it runs the
query, so it fails there, before anything is read; a line the dump grammar
below does not explain refuses the query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from enricher.errors import EnricherError


class QueryRefused(EnricherError, ValueError):
    """A query the endpoint will not run; the message says what to change."""


# ClickHouse functions a query may call, lower-cased. Aggregates also take
# the combinators below (countIf, uniqExactIf, quantilesState, ...). Nothing
# here reads files, URLs, dictionaries, other servers, settings or the process.
ALLOWED_FUNCTIONS = frozenset(f.lower() for f in """
    abs acos asin atan atan2 cbrt ceil ceiling cos cosh degrees e erf exp exp10 exp2 floor intdiv
    intdivorzero ln log log10 log1p log2 modulo moduloorzero negate pi pow power radians round
    roundbankers roundtoexp2 sign sin sinh sqrt tan tanh trunc truncate plus minus multiply divide
    greatest least if multiif casewithexpression coalesce ifnull isnull isnotnull nullif assumenotnull
    tonullable isfinite isinfinite isnan equals notequals less greater lessorequals greaterorequals and or
    not xor in notin exists lambda
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
    tointervalmonth tointervalquarter tointervalyear timeslot timeslots
    length lengthutf8 empty notempty lower upper lowerutf8 upperutf8 reverse concat concatws substring
    substr substringutf8 left right trim trimleft trimright ltrim rtrim startswith endswith position
    positioncaseinsensitive locate like notlike ilike notilike match extract extractall replaceone
    replaceall replaceregexpone replaceregexpall splitbychar splitbystring splitbyregexp
    arraystringconcat format lpad rpad repeat leftpad rightpad base64encode base64decode hex unhex
    tovalidutf8 countsubstrings
    array arrayjoin arrayconcat arrayelement has hasall hasany indexof countequal arraycount arraysum
    arrayavg arraymin arraymax arraymap arrayfilter arraysort arrayreversesort arraydistinct arrayuniq
    arrayslice arrayreverse arrayenumerate arrayzip arrayflatten arraycumsum arraypushback
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
# Functions whose right-hand side the engine reads as a table when it is a bare name.
_MEMBERSHIP = frozenset({"in", "notin", "globalin", "globalnotin", "nullin", "notnullin", "globalnullin",
                         "globalnotnullin"})
# The storage tables a query may name in <database>_store: the one the views
# read, the labels, and the reference profiles drift queries compare against.
STORE_TABLES = ("enriched", "labels", "reference_bins", "reference_values")
# The node kinds of the engine's tree (EXPLAIN AST) a read is made of. Not
# here, hence refused: Set (SETTINGS), QueryParameter, ColumnsApplyTransformer
# (applies a function named by a string), Explain, and every statement kind
# but SELECT and DESCRIBE.
_READ_NODES = frozenset("""
    SelectWithUnionQuery SelectIntersectExceptQuery SelectQuery ExpressionList TablesInSelectQuery
    TablesInSelectQueryElement TableExpression TableIdentifier TableJoin ArrayJoin Subquery WithElement
    Identifier Function Literal Asterisk QualifiedAsterisk ColumnsRegexpMatcher ColumnsListMatcher
    QualifiedColumnsRegexpMatcher QualifiedColumnsListMatcher ColumnsTransformerList
    ColumnsExceptTransformer ColumnsReplaceTransformer ColumnsReplaceTransformer::Replacement
    OrderByElement WindowDefinition WindowListElement SampleRatio
""".split())
_SQL_STRING_LIMIT = 100_000
_DEPTH_LIMIT = 200
_LINE = re.compile(r"^( *)([A-Za-z][A-Za-z:]*)(?: (.*))?$")
_NAME = re.compile(r"^([^ ]+)")
_PLAIN = re.compile(r"^[A-Za-z0-9_]+$")
_ERROR_TEXT = re.compile(r"DB::Exception: (.*?)(?: \(version [^)]*\))?(?:\. \([A-Z_]+\))?$", re.S)


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


def function_allowed(name: str) -> bool:
    return name.lower() in ALLOWED_FUNCTIONS or _base(name).lower() in ALLOWED_FUNCTIONS


@dataclass
class Node:
    kind: str
    text: str
    depth: int
    children: list["Node"] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The name the dump prints first (a function's, an identifier's, a table's)."""
        m = _NAME.match(self.text)
        return m.group(1) if m else ""


@dataclass(frozen=True)
class Plan:
    """What the engine will run for a caller's query, decided on the engine's own tree."""

    sql: str                 # the exact text to run
    row_limit: int | None    # rows beyond this were cut (the text asks for one more to tell)


def parse_dump(lines: list[str]) -> Node:
    """The engine's EXPLAIN AST lines as a tree (one space of indent per level)."""
    root: Node | None = None
    stack: list[Node] = []
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            raise QueryRefused("the query holds a name the endpoint cannot check (a quoted name with a "
                               "line break or another unusual character): use plain names")
        depth = len(m.group(1))
        node = Node(m.group(2), m.group(3) or "", depth)
        if depth > _DEPTH_LIMIT:
            raise QueryRefused("the query is nested too deeply")
        if root is None:
            if depth != 0:
                raise QueryRefused("the engine's tree of the query could not be read")
            root = node
            stack = [node]
            continue
        while stack and stack[-1].depth >= depth:
            stack.pop()
        if not stack or depth != stack[-1].depth + 1:
            raise QueryRefused("the query holds a name the endpoint cannot check (a quoted name with a "
                               "line break or another unusual character): use plain names")
        stack[-1].children.append(node)
        stack.append(node)
    if root is None:
        raise QueryRefused("the engine's tree of the query could not be read")
    return root


class Guard:
    """Plans a caller's query on a ClickHouse connection (embedded or server): see the module's text."""

    def __init__(self, database: str, row_limit: int):
        self.database = database
        self.store = f"{database}_store"
        self.row_limit = row_limit

    def plan(self, client, sql) -> Plan:
        if not isinstance(sql, str) or not sql.strip():
            raise QueryRefused("give one SELECT statement")
        if len(sql) > _SQL_STRING_LIMIT:
            raise QueryRefused(f"the query is {len(sql):,} characters; the limit is {_SQL_STRING_LIMIT:,}")
        canonical = self._canonical(client, sql)
        first = canonical.split(" ", 1)[0].upper()
        if first == "DESCRIBE":
            final, limit = canonical, None
        elif first in ("SELECT", "WITH") or canonical.startswith("("):
            limit = self.row_limit
            final = f"SELECT * FROM ({canonical}) LIMIT {limit + 1}"
        else:
            raise QueryRefused(f"only SELECT (and DESCRIBE) statements are allowed, not {first}: the query "
                               "endpoint only reads")
        try:
            self._format(client, f"EXPLAIN AST {final}")
        except QueryRefused:
            # The canonical statement read on its own; it fails only inside our
            # wrapper, which takes no output clause.
            raise QueryRefused("a FORMAT or INTO OUTFILE clause is not allowed (answers are JSON)") from None
        tree = parse_dump([row[0] for row in client.query(f"EXPLAIN AST {final}").result_rows])
        if limit is None:
            self._check_describe(tree)
        else:
            self._check(self._wrapped(tree, limit), scope=0)
        return Plan(final, limit)

    # -- the engine's parser -------------------------------------------------

    def _format(self, client, sql: str) -> str:
        from clickhouse_connect.driver.exceptions import ClickHouseError

        try:
            return client.query("SELECT formatQuerySingleLine({q:String})", parameters={"q": sql}).result_rows[0][0]
        except ClickHouseError as exc:
            text = str(exc)
            if "Multi-statements are not allowed" in text:
                raise QueryRefused("give exactly one statement (no ';' between statements)") from None
            if "Max query size exceeded" in text or "TOO_DEEP" in text or "too deep" in text.lower():
                raise QueryRefused("the query is nested too deeply or too long") from None
            m = _ERROR_TEXT.search(text)
            detail = (m.group(1) if m else text).split(": In scope SELECT formatQuerySingleLine")[0]
            raise QueryRefused(f"cannot read the query ({detail[:300]})") from None

    def _canonical(self, client, sql: str) -> str:
        canonical = self._format(client, sql)
        if not canonical:
            raise QueryRefused("give one SELECT statement")
        return canonical

    # -- the allow-list, on the engine's tree --------------------------------

    def _wrapped(self, root: Node, limit: int) -> Node:
        """The caller's statement inside our `SELECT * FROM (...) LIMIT n`, checked to be just that."""
        def shape_error():
            return QueryRefused("the query does not read as one SELECT: the query endpoint only reads")

        if root.kind != "SelectWithUnionQuery" or not root.children:
            raise shape_error()
        # After the statement, only the output format the client library itself appends.
        if any(c.kind != "Identifier" or c.text != "Native" for c in root.children[1:]):
            raise shape_error()
        union = root.children[0]
        if union.kind != "ExpressionList" or len(union.children) != 1:
            raise shape_error()
        select = union.children[0]
        if select.kind != "SelectQuery" or len(select.children) != 3:
            raise shape_error()
        columns, tables, limit_node = select.children
        if (columns.kind, [c.kind for c in columns.children]) != ("ExpressionList", ["Asterisk"]) \
                or columns.children[0].children:
            raise shape_error()
        if (limit_node.kind, limit_node.text, limit_node.children) != ("Literal", f"UInt64_{limit + 1}", []):
            raise shape_error()
        path = [tables]
        for kind in ("TablesInSelectQuery", "TablesInSelectQueryElement", "TableExpression", "Subquery"):
            node = path[-1]
            if node.kind != kind or len(node.children) != 1:
                raise shape_error()
            path.append(node.children[0])
        inner = path[-1]
        if inner.kind != "SelectWithUnionQuery":
            raise shape_error()
        return inner

    def _check_describe(self, root: Node) -> None:
        if root.kind != "DescribeQuery" or not root.children:
            raise QueryRefused("only SELECT (and DESCRIBE) statements are allowed")
        table_expr, rest = root.children[0], root.children[1:]
        if any(c.kind != "Identifier" or c.text != "Native" for c in rest):
            raise QueryRefused("DESCRIBE takes one table: DESCRIBE <database>.<model_id>")
        if table_expr.kind != "TableExpression" or len(table_expr.children) != 1 \
                or table_expr.children[0].kind != "TableIdentifier":
            raise QueryRefused(f"DESCRIBE takes one table: DESCRIBE {self.database}.<model_id>")
        self._check_table(table_expr.children[0])

    def _check(self, node: Node, scope: int) -> None:
        stack = [node]
        while stack:
            node = stack.pop()
            kind = node.kind
            if kind == "Set":
                raise QueryRefused("a SETTINGS clause is not allowed (the limits are the endpoint's: "
                                   "ENRICHER_QUERY_MAX_SECONDS, ENRICHER_QUERY_MAX_ROWS, "
                                   "ENRICHER_QUERY_MAX_MEMORY)")
            if kind == "QueryParameter":
                raise QueryRefused("query parameters ({name:Type}) are not supported: write the value")
            if kind == "ColumnsApplyTransformer":
                raise QueryRefused("APPLY is not allowed: call the function on the columns you want")
            if kind not in _READ_NODES:
                raise QueryRefused(f"{kind} is not allowed: the query endpoint only reads")
            if kind == "SelectWithUnionQuery" and (len(node.children) != 1
                                                  or node.children[0].kind != "ExpressionList"):
                raise QueryRefused("a FORMAT or INTO OUTFILE clause is not allowed (answers are JSON)")
            if kind == "TableExpression":
                for child in node.children:
                    if child.kind == "Function":
                        raise QueryRefused(f"table function {child.name}() is not allowed: read "
                                           f"{self.database}.<model_id> or {self.store}.enriched")
            if kind == "Function":
                name = node.name
                if not function_allowed(name):
                    raise QueryRefused(f"function {name}() is not allowed here: the query endpoint computes on "
                                       "the enriched tables' values only (no files, URLs, dictionaries, other "
                                       "servers, settings or process functions)")
                if name.lower() in _MEMBERSHIP:
                    args = node.children[0].children if node.children else []
                    if len(args) == 2 and args[1].kind == "Identifier":
                        raise QueryRefused(f"IN {args[1].name}: IN takes values or a subquery here, "
                                           f"e.g. IN (SELECT ... FROM {self.database}.<model_id>)")
            if kind == "TableIdentifier":
                self._check_table(node)
            stack.extend(node.children)

    def _check_table(self, node: Node) -> None:
        name = node.name
        db, dot, table = name.partition(".")
        if not dot:
            # The engine looks a bare name up among the query's own WITH names,
            # then in the session's database: the views' (queries.py sets it).
            if not _PLAIN.match(name):
                raise QueryRefused(f"table {name!r}: use a plain name")
            return
        if db == self.database and _PLAIN.match(table):
            return
        if db == self.store and table in STORE_TABLES:
            return
        if db == self.store:
            raise QueryRefused(f"table {name}: in {self.store} only {', '.join(STORE_TABLES)} can be read")
        raise QueryRefused(f"database {db!r} is not readable here: only {self.database} (one view per model) "
                           f"and {self.store} ({', '.join(STORE_TABLES)})")
