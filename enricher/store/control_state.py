"""The registry's state (models, toggles, training statuses) in ClickHouse, with
reference data and model files in the artifact store: no shared volume.

`ENRICHER_CONTROL_STORE=clickhouse`. Workers on several machines, the trigger
and the workflow's pods already reach both (the worker writes to ClickHouse,
the training steps read labelled rows from it and publish to the artifact
store), so nothing new has to be deployed or mounted. Why ClickHouse rather
than the object store alone or a compacted Kafka topic:

- **concurrent writers, no lock.** Every write is one INSERT of one small row
  (model, key, value) stamped by the *server's* clock (`now64(6)`: one clock,
  whatever the writers' skew); a read takes each key's latest row
  (`argMax`). Keys are as fine as the changes users make: a PATCH that turns
  bias mitigation on writes `enabled/bias_mitigation` and nothing else, so
  two PATCHes at once from two machines lose nothing, with no read-modify-write
  to race. A registration writes spec, slots and the reference's address in
  one row: a reader sees all of a registration or none of it. An object store
  would need conditional writes (If-Match) for the same, which not every
  S3-compatible store has and pyarrow's filesystem does not expose; a
  compacted topic makes every reader replay it to its end, and end offsets are
  what some brokers get wrong (SERVICES.md: Tansu).
- **nothing to migrate.** The table is `<database>_store.control`, beside the
  other store tables; an operator reads it with SQL.

Reference data and model files are written once under content-addressed names
(`_registry/<model>/reference-<sha256>.parquet`) in the artifact store and
checked against the digest the registration row holds when read: a row never
points at bytes that can change.

Within one process writes are serialised by a lock (`locked()`); across
processes there is no lock, and none is needed: last writer wins per key, and
keys never span two users' intentions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from enricher.config import Settings
from enricher.models.artifact import Files
from enricher.store.clickhouse import CONTROL, Topology, connect, control_ddl

# A model's rows are re-read at most this often; own writes, and a new generation seen
# by `generation()` (what the worker polls), drop them at once.
CACHE_SECONDS = 0.2


class ClickHouseState:
    """The registry's state in ClickHouse and the artifact store (see above)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.topology = Topology(settings.clickhouse_database, settings.clickhouse_cluster)
        self.table = self.topology.table(CONTROL)
        artifacts = settings.artifact_store_url or str(settings.artifact_dir)
        self.files = Files(artifacts)
        self._local = threading.local()
        self._lock = threading.RLock()
        self._cache: dict[str, tuple[float, dict]] = {}
        self._generation = 0
        self._ready = False
        self.writer = uuid.uuid4().hex[:12]

    def where(self) -> str:
        return f"ClickHouse table {self.table} (and {self.files.location}/_registry)"

    # -- the connection ---------------------------------------------------------
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = connect(self.settings)
        if not self._ready:
            for statement in self.topology.databases()[1:] + control_ddl(self.topology):
                client.command(statement)
            self._ready = True
        return client

    def close(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None

    def _write(self, model_id: str, rows: dict[str, str]) -> None:
        """Several keys of one model in one INSERT (all of them or none), stamped by the server."""
        values = " UNION ALL ".join(
            f"SELECT {{m:String}}, {{k{i}:String}}, {{v{i}:String}}, now64(6, 'UTC'), {{w:String}}"
            for i in range(len(rows)))
        parameters = {"m": model_id, "w": self.writer}
        for i, (key, value) in enumerate(rows.items()):
            parameters[f"k{i}"], parameters[f"v{i}"] = key, value
        self._client().command(f"INSERT INTO {self.table} (model_id, key, value, written_at, writer) {values}",
                               parameters=parameters)
        self._cache.pop(model_id, None)

    def _model(self, model_id: str) -> dict[str, str]:
        """Each key of the model at its latest write."""
        cached = self._cache.get(model_id)
        if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
            return cached[1]
        rows = self._client().query(f"SELECT key, argMax(value, (written_at, writer)) FROM {self.table} "
                                    f"WHERE model_id = {{m:String}} GROUP BY key",
                                    parameters={"m": model_id}).result_rows
        found = {key: value for key, value in rows}
        self._cache[model_id] = (time.monotonic(), found)
        return found

    @contextlib.contextmanager
    def locked(self):
        with self._lock:
            yield

    # -- models ---------------------------------------------------------------
    def model_ids(self) -> list[str]:
        rows = self._client().query(f"SELECT DISTINCT model_id FROM {self.table} WHERE key = 'model'").result_rows
        return sorted(r[0] for r in rows)

    def _registration(self, model_id: str) -> dict | None:
        raw = self._model(model_id).get("model")
        return json.loads(raw) if raw else None

    def spec(self, model_id: str) -> dict | None:
        found = self._registration(model_id)
        return None if found is None else found["spec"]

    def slots(self, model_id: str) -> dict | None:
        found = self._registration(model_id)
        return None if found is None else found["slots"]

    def _blob(self, model_id: str, name: str, data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        path = f"_registry/{model_id}/{digest}-{name}"
        self.files.write(self.files.path(*path.split("/")), data)
        return {"path": path, "sha256": digest, "name": name}

    def _read_blob(self, where: dict) -> bytes:
        data = self.files.read(self.files.path(*where["path"].split("/")))
        if hashlib.sha256(data).hexdigest() != where["sha256"]:
            raise OSError(f"{where['path']} in the artifact store does not match its registration "
                          f"(sha256 {where['sha256'][:12]}...): changed or damaged since")
        return data

    def put_model(self, model_id: str, spec: dict, assigned: dict, reference: pa.Table,
                  model_file: tuple[str, bytes] | None) -> None:
        buf = io.BytesIO()
        pq.write_table(reference, buf)
        # the bytes first, under names of their own digest; then the one row that points at them
        doc = {"spec": spec, "slots": assigned, "reference": self._blob(model_id, "reference.parquet",
                                                                         buf.getvalue()),
               "model_file": self._blob(model_id, model_file[0], model_file[1]) if model_file else None}
        with self.locked():
            self._write(model_id, {"model": json.dumps(doc, sort_keys=True)})
            self.touch()

    def _reference_bytes(self, model_id: str) -> bytes:
        return self._read_blob(self._registration(model_id)["reference"])

    def reference(self, model_id: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self._reference_bytes(model_id)))

    def reference_schema(self, model_id: str) -> pa.Schema:
        return pq.read_schema(io.BytesIO(self._reference_bytes(model_id)))

    def reference_digest(self, model_id: str) -> str:
        return self._registration(model_id)["reference"]["sha256"]

    def model_file(self, model_id: str) -> tuple[str, bytes] | None:
        where = self._registration(model_id)["model_file"]
        return None if where is None else (where["name"], self._read_blob(where))

    # -- toggles, status, change detection --------------------------------------
    def toggles(self, model_id: str) -> dict[str, dict]:
        found: dict[str, dict] = {}
        for key, value in self._model(model_id).items():
            kind, _, name = key.partition("/")
            if kind in ("enabled", "config"):
                found.setdefault(name, {})[kind] = json.loads(value)
        return found

    def set_toggle(self, model_id: str, name: str, enabled: bool | None, config: dict | None) -> None:
        rows = {}
        if enabled is not None:
            rows[f"enabled/{name}"] = json.dumps(bool(enabled))
        if config is not None:
            rows[f"config/{name}"] = json.dumps(config, sort_keys=True)
        with self.locked():
            if rows:
                self._write(model_id, rows)
            self.touch()

    def status(self, model_id: str, name: str) -> dict:
        raw = self._model(model_id).get(f"status/{name}")
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            return {}

    def set_status(self, model_id: str, name: str, doc: dict) -> None:
        self._write(model_id, {f"status/{name}": json.dumps(doc, sort_keys=True)})

    def generation(self) -> int:
        """The server time of the latest change (microseconds): it moves on every write."""
        rows = self._client().query(f"SELECT toUnixTimestamp64Micro(max(written_at)) FROM {self.table} "
                                    f"WHERE model_id = '' AND key = 'generation'").result_rows
        generation = int(rows[0][0] or 0) if rows else 0
        if generation != self._generation:  # a change seen: what was cached before it is not read again
            self._generation = generation
            self._cache.clear()
        return generation

    def touch(self) -> None:
        self._write("", {"generation": ""})
