"""The artifact: the one contract between training and serving.

An artifact is a folder `<root>/<model_id>/<enrichment>/<version>/` holding the
files an enrichment saved plus `manifest.json` (format version, model,
enrichment, version, sha256 of every file, training rows, parameters,
created_at, and an HMAC signature when a signing key is configured).

Publishing writes into a hidden temporary folder and renames it into place,
then swaps the `CURRENT` pointer with an atomic rename, so a reader sees either
the old version or the whole new one. Loading reads each file's bytes once,
checks their hashes (and the signature) and only then hands those same bytes
to the enrichment to deserialise: nothing is unpickled before it is verified,
and a file swapped after the check is never read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class ArtifactError(RuntimeError):
    """An artifact is missing or unusable."""


class IntegrityError(ArtifactError):
    """An artifact's files do not match its manifest (tampered or corrupted)."""


@dataclass
class Manifest:
    format_version: int
    model_id: str
    enrichment: str
    version: int
    files: dict[str, str]
    training_rows: int
    parameters: dict
    created_at: str
    signature: str | None = field(default=None)

    def signed_payload(self) -> bytes:
        body = asdict(self)
        body.pop("signature", None)
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class VerifiedArtifact:
    manifest: Manifest
    blobs: dict[str, bytes]
    path: Path


def version_dir(version: int) -> str:
    return f"v{version:06d}"


class ArtifactStore:
    """Versioned, verified artifacts under a local root directory."""

    def __init__(self, root: str | Path, signing_key: bytes | None = None):
        self.root = Path(root)
        self.signing_key = signing_key

    def _dir(self, model_id: str, enrichment: str) -> Path:
        return self.root / model_id / enrichment

    def versions(self, model_id: str, enrichment: str) -> list[int]:
        base = self._dir(model_id, enrichment)
        if not base.is_dir():
            return []
        found = (_VERSION_DIR.match(p.name) for p in base.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def current_version(self, model_id: str, enrichment: str) -> int | None:
        pointer = self._dir(model_id, enrichment) / CURRENT
        try:
            text = pointer.read_text().strip()
        except FileNotFoundError:
            return None
        m = _VERSION_DIR.match(text)
        if not m:
            raise ArtifactError(f"{pointer}: holds {text!r}, not a version folder name")
        return int(m.group(1))

    def publish(
        self,
        model_id: str,
        enrichment: str,
        blobs: dict[str, bytes],
        training_rows: int,
        parameters: dict,
    ) -> Manifest:
        """Write a new version and make it current; returns its manifest."""
        base = self._dir(model_id, enrichment)
        base.mkdir(parents=True, exist_ok=True)
        for name in blobs:
            if not _FILE_NAME.match(name) or name == MANIFEST:
                raise ArtifactError(f"artifact file name {name!r} is not allowed")
        tmp = Path(tempfile.mkdtemp(prefix=".publishing-", dir=base))
        try:
            hashes = {}
            for name, data in blobs.items():
                (tmp / name).write_bytes(data)
                hashes[name] = hashlib.sha256(data).hexdigest()
            version = max(self.versions(model_id, enrichment), default=0) + 1
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                model_id=model_id,
                enrichment=enrichment,
                version=version,
                files=hashes,
                training_rows=int(training_rows),
                parameters=parameters,
                created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            )
            if self.signing_key:
                manifest.signature = hmac.new(self.signing_key, manifest.signed_payload(), "sha256").hexdigest()
            (tmp / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True))
            _fsync_dir(tmp)
            # rename() of a directory fails if the target exists, so two
            # publishers racing for one version number cannot overwrite each other.
            os.rename(tmp, base / version_dir(version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._point_current(base, version)
        return manifest

    def set_current(self, model_id: str, enrichment: str, version: int) -> Manifest:
        """Point CURRENT at an existing version after verifying it (rollback)."""
        artifact = self.load(model_id, enrichment, version)
        self._point_current(self._dir(model_id, enrichment), version)
        return artifact.manifest

    def _point_current(self, base: Path, version: int) -> None:
        tmp = base / f".{CURRENT}.{os.getpid()}"
        tmp.write_text(version_dir(version) + "\n")
        os.replace(tmp, base / CURRENT)

    def load(self, model_id: str, enrichment: str, version: int | None = None) -> VerifiedArtifact:
        """Read and verify one version (the current one by default)."""
        if version is None:
            version = self.current_version(model_id, enrichment)
            if version is None:
                raise ArtifactError(f"no {enrichment} artifact for model {model_id!r}: train it first")
        path = self._dir(model_id, enrichment) / version_dir(version)
        return verify(path, self.signing_key, expect=(model_id, enrichment, version))


def verify(path: Path, signing_key: bytes | None = None,
           expect: tuple[str, str, int] | None = None) -> VerifiedArtifact:
    """Read an artifact folder and check every file against its manifest."""
    try:
        raw = json.loads((path / MANIFEST).read_text())
        manifest = Manifest(**raw)
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: no {MANIFEST}") from exc
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"{path}/{MANIFEST}: unreadable manifest ({exc})") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format {manifest.format_version}, this release reads {FORMAT_VERSION}"
        )
    if expect and (manifest.model_id, manifest.enrichment, manifest.version) != expect:
        raise IntegrityError(f"{path}: manifest names {manifest.model_id}/{manifest.enrichment}/"
                             f"v{manifest.version}, not the folder it sits in")
    if signing_key is not None:
        if not manifest.signature:
            raise IntegrityError(f"{path}: manifest is not signed, and a signing key is configured")
        wanted = hmac.new(signing_key, manifest.signed_payload(), "sha256").hexdigest()
        if not hmac.compare_digest(wanted, manifest.signature):
            raise IntegrityError(f"{path}: manifest signature does not match (tampered, or another key)")
    present = {p.name for p in path.iterdir() if p.is_file()} - {MANIFEST}
    if present != set(manifest.files):
        raise IntegrityError(f"{path}: files {sorted(present)} differ from the manifest's {sorted(manifest.files)}")
    blobs = {}
    for name, digest in manifest.files.items():
        if not _FILE_NAME.match(name):
            raise IntegrityError(f"{path}: manifest names an unsafe file {name!r}")
        data = (path / name).read_bytes()
        if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), digest):
            raise IntegrityError(f"{path}/{name}: sha256 does not match the manifest (tampered or corrupted)")
        blobs[name] = data
    return VerifiedArtifact(manifest, blobs, path)


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
