"""A test fixture, not a product part: ClickHouse's HTTP interface over chDB.

No ClickHouse server can be installed on our machines; this small front end
speaks enough of the HTTP protocol for clickhouse-connect's default HTTP
client (queries in the URL or body, `param_*` bindings, Arrow/Native/JSON
bodies, lz4 request bodies of any number of frames, Basic auth) and runs each
statement on one chDB connection. It lets the tests drive the product's
server code path (`ENRICHER_CLICKHOUSE_URL=http://...`) against the real
engine, from other processes too.
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import chdb
import lz4.frame

_INSERT_FORMAT = re.compile(r"^\s*(INSERT\s+INTO\s+.+?)\s+FORMAT\s+(\w+)\s*$", re.IGNORECASE | re.DOTALL)
_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*$", re.IGNORECASE)


def _decompress(body: bytes, encoding: str | None) -> bytes:
    if encoding != "lz4":
        return body
    out = []
    while body:  # one request body may hold many lz4 frames
        d = lz4.frame.LZ4FrameDecompressor()
        out.append(d.decompress(body))
        body = d.unused_data
    return b"".join(out)


class ClickHouseHTTP:
    def __init__(self, path: str | Path, user: str = "default", password: str = "", port: int = 0,
                 users: dict | None = None):
        self.conn = chdb.connect(str(path))
        self.lock = threading.Lock()
        self.user, self.password = user, password
        # more users it lets in (name -> password), and what each asked: (user, sql)
        self.users = {user: password, **(users or {})}
        self.seen: list[tuple[str, str]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="ch-http-"))
        self.requests = 0
        self.stopped = False
        self.inserted_rows = 0
        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, database: str = "enricher") -> str:
        return f"http://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def start(self) -> "ClickHouseHTTP":
        self.thread.start()
        return self

    def stop(self) -> None:
        # Kept-alive connections live on in their handler threads: they must
        # see the server gone too, as a client would after a real outage.
        self.stopped = True
        self.server.shutdown()
        self.server.server_close()
        self.conn.close()

    def query(self, sql: str, fmt: str = "JSONCompact") -> dict:
        with self.lock:
            return json.loads(self.conn.query(sql, fmt).bytes())

    def _handler(self):
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._serve(b"")

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                self._serve(self.rfile.read(length))

            def _serve(self, body: bytes):
                if front.stopped:
                    self.close_connection = True
                    return
                front.requests += 1
                user = self._authorised()
                if user is None:
                    return self._reply(516, b"Code: 516. DB::Exception: default: Authentication failed. "
                                            b"(AUTHENTICATION_FAILED)", {"X-ClickHouse-Exception-Code": "516"})
                parts = urlsplit(self.path)
                params = dict(parse_qsl(parts.query, keep_blank_values=True))
                if parts.path == "/ping":
                    return self._reply(200, b"Ok.\n")
                body = _decompress(body, self.headers.get("Content-Encoding"))
                bindings = {k[len("param_"):]: v for k, v in params.items() if k.startswith("param_")}
                sql = params.get("query")
                data = None
                if sql is None:
                    sql = body.decode()
                elif body:
                    data = body
                front.seen.append((user, sql))
                try:
                    result, fmt, written = self._execute(sql, data, bindings)
                except Exception as exc:  # the engine's own message, as a server would send it
                    code = re.search(r"Code: (\d+)", str(exc))
                    return self._reply(500, str(exc).encode(),
                                       {"X-ClickHouse-Exception-Code": code.group(1) if code else "1"})
                summary = json.dumps({"written_rows": str(written), "read_rows": "0"})
                self._reply(200, result, {"X-ClickHouse-Format": fmt, "X-ClickHouse-Timezone": "UTC",
                                          "X-ClickHouse-Summary": summary,
                                          "X-ClickHouse-Query-Id": str(uuid.uuid4())})

            def _execute(self, sql: str, data: bytes | None, bindings: dict):
                if data is not None:
                    m = _INSERT_FORMAT.match(sql)
                    if not m:
                        raise ValueError(f"Code: 62. cannot tell the format of data sent with {sql[:80]!r}")
                    path = front.tmp / f"{uuid.uuid4().hex}.{m.group(2)}"
                    path.write_bytes(data)
                    try:
                        with front.lock:
                            front.conn.query(f"{m.group(1)} FROM INFILE '{path}' FORMAT {m.group(2)}", "CSV")
                        rows = _arrow_rows(data, m.group(2))
                        front.inserted_rows += rows
                        return b"", m.group(2), rows
                    finally:
                        path.unlink()
                fmt_match = _FORMAT.search(sql)
                fmt = fmt_match.group(1) if fmt_match else "TabSeparated"
                with front.lock:
                    res = front.conn.query(sql, fmt, params=bindings or None)
                return res.bytes(), fmt, 0

            def _authorised(self) -> str | None:
                """The user, if its password is right."""
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                else:
                    user = self.headers.get("X-ClickHouse-User", "default")
                    password = self.headers.get("X-ClickHouse-Key", "")
                return user if user in front.users and front.users[user] == password else None

            def _reply(self, status: int, payload: bytes, headers: dict | None = None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler


def _arrow_rows(data: bytes, fmt: str) -> int:
    import pyarrow as pa

    if fmt.lower() == "arrow":
        return pa.ipc.open_file(pa.BufferReader(data)).read_all().num_rows
    if fmt.lower() == "arrowstream":
        return pa.ipc.open_stream(pa.BufferReader(data)).read_all().num_rows
    return 0
