"""ClickHouse's own parser on SQL we write for a server (DDL for a DBA, init scripts): each
statement goes through `formatQuery` in the engine (chDB), which parses it and prints it back,
or fails with the parser's message. In a child process: chDB keeps one session per process,
and the test process may hold another."""

import json
import subprocess
import sys

_CHILD = r"""
import json, sys
import chdb
out = []
for statement in json.load(sys.stdin):
    literal = "'" + statement.replace("\\", "\\\\").replace("'", "\\'") + "'"
    try:
        out.append([True, json.loads(chdb.query(f"SELECT formatQuery({literal})", "JSONCompact").data())["data"][0][0]])
    except Exception as exc:
        out.append([False, str(exc)])
print(json.dumps(out))
"""


def parse(statements: list[str]) -> list[tuple[bool, str]]:
    """(parsed, the statement as ClickHouse prints it back or the parser's error) per statement."""
    done = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(statements), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [(ok, text) for ok, text in json.loads(done.stdout.strip().splitlines()[-1])]
