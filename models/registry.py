"""The model registry: each model's spec, reference data and enrichment toggles.

Kept as files under one directory so that the CLI, the worker and training
steps share it without a server:

    <root>/<model_id>/spec.json          validated schema
    <root>/<model_id>/reference.parquet  normalised reference data
    <root>/<model_id>/enrichments.json   {"anomaly_detection": {"enabled": true, "config": {}}}
    <root>/<model_id>/slots.json         where each column is stored (models/slots.py)
    <root>/<model_id>/model_file/<name>  the user's own tree model, if registered (models/usermodels.py)
    <root>/<model_id>/status/<name>.json where that enrichment's training stands
    <root>/GENERATION                    bumped on every change

Readers poll GENERATION (one small file) to learn that something changed.
Every write goes through a temporary file of its own (unique per call, so
threads and processes never share one) and an atomic rename, and every
read-modify-write (a toggle, a registration, the generation) holds an
exclusive lock on `<root>/.lock` (flock: threads and processes on one
machine alike; on a shared volume, as far as its filesystem honours flock).
So two PATCHes at once, from two threads or two processes, lose nothing:
each changes only what it names, on the state the other left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from enricher.errors import EnricherError

from . import ENRICHMENTS, slots
from .reference import ReferenceDataError, normalise, read_bytes, read_table
from .spec import ModelSpec, SpecError, check_model_id

# disabled: off. pending: on, waiting for a training run. training: a run is
# fitting it. ready: a published artifact serves it. failed: the last run failed.
STATES = ("disabled", "pending", "training", "ready", "failed")


_HELD = threading.local()  # per thread: registry roots whose lock it holds, and how deep


class UnknownModel(EnricherError, KeyError):
    def __str__(self) -> str:
        return f"model {self.args[0]!r} is not registered (see `enricher models list`)"


class DirectoryState:
    """Where the registry keeps its state: one directory (the layout above), one
    machine or a shared volume. `enricher/store/control_state.py` keeps the same
    in ClickHouse and the object store, for deployments with no shared volume."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def where(self) -> str:
        return str(self.root)

    @contextlib.contextmanager
    def locked(self):
        """Exclusive access to the registry for one read-modify-write; re-entrant
        within a thread (whichever registry object of the same root holds it)."""
        held = _HELD.__dict__.setdefault("roots", {})
        key = str(self.root.resolve())
        if held.get(key):
            held[key] += 1
            try:
                yield
            finally:
                held[key] -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            held[key] = 1
            try:
                yield
            finally:
                held[key] = 0
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- models ---------------------------------------------------------
    def model_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "spec.json").is_file())

    def spec(self, model_id: str) -> dict | None:
        try:
            return json.loads((self.root / model_id / "spec.json").read_text())
        except FileNotFoundError:
            return None

    def slots(self, model_id: str) -> dict | None:
        try:
            return json.loads((self.root / model_id / "slots.json").read_text())
        except FileNotFoundError:
            return None

    def put_model(self, model_id: str, spec: dict, assigned: dict, reference: pa.Table,
                  model_file: tuple[str, bytes] | None) -> None:
        folder = self.root / model_id
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".reference.", suffix=".parquet")
        os.close(fd)
        try:
            pq.write_table(reference, tmp)
            with self.locked():
                os.replace(tmp, folder / "reference.parquet")
                files = folder / "model_file"
                if files.is_dir():
                    for old in files.iterdir():
                        old.unlink()
                if model_file is not None:
                    files.mkdir(exist_ok=True)
                    _write_bytes(files / model_file[0], model_file[1])
                # Slots before the spec: a reader that sees the new spec finds its slots.
                _write_json(folder / "slots.json", assigned)
                _write_json(folder / "spec.json", spec)
                if not (folder / "enrichments.json").exists():
                    _write_json(folder / "enrichments.json", {})
                self.touch()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def reference(self, model_id: str) -> pa.Table:
        return pq.read_table(self.root / model_id / "reference.parquet")

    def reference_schema(self, model_id: str) -> pa.Schema:
        return pq.read_schema(self.root / model_id / "reference.parquet")

    def reference_digest(self, model_id: str) -> str:
        """sha256 of the stored reference data (cached by size and mtime)."""
        path = self.root / model_id / "reference.parquet"
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _DIGESTS:
            h = hashlib.sha256()
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    h.update(chunk)
            _DIGESTS[key] = h.hexdigest()
        return _DIGESTS[key]

    def model_file(self, model_id: str) -> tuple[str, bytes] | None:
        folder = self.root / model_id / "model_file"
        found = sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
        return (found[0].name, found[0].read_bytes()) if found else None

    # -- toggles, status, change detection --------------------------------
    def toggles(self, model_id: str) -> dict[str, dict]:
        try:
            return json.loads((self.root / model_id / "enrichments.json").read_text())
        except FileNotFoundError:
            return {}

    def set_toggle(self, model_id: str, name: str, enabled: bool | None, config: dict | None) -> None:
        with self.locked():
            current = self.toggles(model_id)
            entry = current.setdefault(name, {"enabled": False, "config": {}})
            if config is not None:
                entry["config"] = config
            if enabled is not None:
                entry["enabled"] = bool(enabled)
            _write_json(self.root / model_id / "enrichments.json", current)
            self.touch()

    # One file per enrichment: the control plane, the trigger and the
    # workflow's steps each write their own transitions, never a shared file.
    def status(self, model_id: str, name: str) -> dict:
        try:
            return json.loads((self.root / model_id / "status" / f"{name}.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def set_status(self, model_id: str, name: str, doc: dict) -> None:
        folder = self.root / model_id / "status"
        folder.mkdir(parents=True, exist_ok=True)
        with self.locked():
            _write_json(folder / f"{name}.json", doc)

    def generation(self) -> int:
        try:
            return int((self.root / "GENERATION").read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def touch(self) -> None:
        with self.locked():
            _write_text(self.root / "GENERATION", str(self.generation() + 1))


_DIGESTS: dict[tuple, str] = {}


class ModelRegistry:
    """Models, toggles and statuses, checked here and kept by a state backend
    (`DirectoryState` for a path; `Settings.registry()` picks what the settings name)."""

    def __init__(self, root: str | Path | DirectoryState):
        self.state = root if hasattr(root, "put_model") else DirectoryState(root)

    def locked(self):
        return self.state.locked()

    def where(self) -> str:
        """Where the state is kept, for messages."""
        return self.state.where()

    # -- models ---------------------------------------------------------
    def register(self, model_id: str, schema: dict, reference_path: str | Path,
                 model_file: str | Path | None = None) -> ModelSpec:
        """Register (or replace) a model: schema, reference data, and optionally the
        model itself as a tree-model file (replacing without one removes a stored one)."""
        spec = ModelSpec.from_json(model_id, schema)
        reference = normalise(spec, read_table(reference_path))
        model = None
        if model_file is not None:
            from . import usermodels  # lazy: numba

            name = Path(str(model_file).split("?", 1)[0]).name
            try:
                usermodels.check_name(name)  # a pickle is refused before a byte of it is read
                data = read_bytes(model_file, "model file", usermodels.MAX_BYTES)
                read = usermodels.load(name, data, len(spec.features))  # refused now, not at training
                predicted = (pc.unique(reference.column("prediction").drop_null()).to_pylist()
                             if spec.prediction_type == "categorical" else None)
                usermodels.check_schema(read, spec, predicted)
            except (usermodels.ModelFileError, ReferenceDataError) as exc:
                raise SpecError(f"model_file: {exc}") from None
            model = (name, data)
        if self.state.spec(check_model_id(model_id)) is not None:  # what is on must still be usable
            for name in self.enabled(model_id):
                ENRICHMENTS[name].check_model(spec, reference.schema)
        self.state.put_model(model_id, spec.to_json(), slots.assign(spec.columns, self._slots(model_id)),
                             reference, model)
        return self.get(model_id)

    def _slots(self, model_id: str) -> dict:
        stored = self.state.slots(model_id)
        if stored is not None:
            return stored
        old = self.state.spec(model_id)  # registered before slots existed: its columns took them in order
        return {} if old is None else slots.assign(ModelSpec.from_json(model_id, old, stored=True).columns)

    def ids(self) -> list[str]:
        return self.state.model_ids()

    def get(self, model_id: str) -> ModelSpec:
        doc = self.state.spec(check_model_id(model_id))
        if doc is None:
            raise UnknownModel(model_id)
        spec = ModelSpec.from_json(model_id, doc, stored=True)
        assigned = slots.assign(spec.columns, self._slots(model_id))
        return dataclasses.replace(spec, slots=slots.column_names(spec.columns, assigned))

    def specs(self) -> dict[str, ModelSpec]:
        return {m: self.get(m) for m in self.ids()}

    def reference(self, model_id: str) -> pa.Table:
        self.get(model_id)
        return self.state.reference(model_id)

    def reference_digest(self, model_id: str) -> str:
        """sha256 of the stored reference data: what drift's reference histograms were made from."""
        self.get(model_id)
        return self.state.reference_digest(model_id)

    def model_file(self, model_id: str) -> tuple[str, bytes] | None:
        """The registered model file (name, bytes), or None."""
        self.get(model_id)
        return self.state.model_file(model_id)

    def reference_schema(self, model_id: str) -> pa.Schema:
        """The normalised reference data's columns and types (what `check_model` asks about)."""
        self.get(model_id)
        return self.state.reference_schema(model_id)

    def check_usable(self, model_id: str, name: str) -> None:
        """Raise `Unusable` (a SpecError) saying why, if the model cannot use the enrichment."""
        ENRICHMENTS[name].check_model(self.get(model_id), self.reference_schema(model_id))

    # -- enrichment toggles --------------------------------------------
    def enrichments(self, model_id: str) -> dict[str, dict]:
        """Every known enrichment with its toggle: {"enabled": bool, "config": {...}}."""
        self.get(model_id)
        stored = self.state.toggles(model_id)
        return {name: {"enabled": bool(stored.get(name, {}).get("enabled", False)),
                       "config": stored.get(name, {}).get("config", {})}
                for name in ENRICHMENTS}

    def enabled(self, model_id: str) -> dict[str, dict]:
        return {n: t["config"] for n, t in self.enrichments(model_id).items() if t["enabled"]}

    def set_enrichment(self, model_id: str, name: str, enabled: bool | None = None,
                       config: dict | None = None) -> dict:
        """Change what is given (None: leave as it is), on the state as it is now."""
        if name not in ENRICHMENTS:
            raise SpecError(f"unknown enrichment {name!r}; known: {', '.join(sorted(ENRICHMENTS))}")
        if config is not None:
            ENRICHMENTS[name].check_config(config)
        if enabled:
            self.check_usable(model_id, name)
        self.get(model_id)
        self.state.set_toggle(model_id, name, enabled, config)
        return self.enrichments(model_id)

    # -- training status -----------------------------------------------
    def status(self, model_id: str, name: str) -> dict:
        return self.state.status(check_model_id(model_id), name)

    def set_status(self, model_id: str, name: str, state: str, **fields) -> dict:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}; one of {', '.join(STATES)}")
        doc = {"state": state, "updated_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
               **fields}
        self.state.set_status(check_model_id(model_id), name, doc)
        return doc

    def copy_to(self, target: "ModelRegistry") -> list[str]:
        """Every model of this registry, with its reference data, model file, toggles and
        statuses, into `target` (another state backend); returns the models copied."""
        copied = []
        for model_id in self.ids():
            spec = self.state.spec(model_id)
            target.state.put_model(model_id, spec, self._slots(model_id), self.state.reference(model_id),
                                   self.state.model_file(model_id))
            for name, toggle in self.state.toggles(model_id).items():
                target.state.set_toggle(model_id, name, toggle.get("enabled"), toggle.get("config"))
            for name in ENRICHMENTS:
                status = self.state.status(model_id, name)
                if status:
                    target.state.set_status(model_id, name, status)
            copied.append(model_id)
        target.touch()
        return copied

    # -- change detection ----------------------------------------------
    # Readers poll the generation (one small read) to learn that something changed.
    def generation(self) -> int:
        return self.state.generation()

    def touch(self) -> None:
        """Announce a change (a registration, a toggle, a published artifact)."""
        self.state.touch()


def _write_json(path: Path, doc: dict) -> None:
    _write_text(path, json.dumps(doc, indent=2, sort_keys=True))


def _write_bytes(path: Path, data: bytes) -> None:
    """Whole or not at all: a temporary file of this call's own, then a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_text(path: Path, text: str) -> None:
    _write_bytes(path, text.encode())
