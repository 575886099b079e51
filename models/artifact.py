"""The artifact: the one contract between training and serving.

An artifact is a folder `<root>/<model_id>/<enrichment>/<version>/` holding the
files an enrichment saved plus `manifest.json` (format version, model,
enrichment, version, sha256 of every file, training rows, parameters,
created_at, the workflow that made it, and an HMAC signature when a signing
key is configured). The root is a local directory or an object store
(`s3://bucket/prefix`, through pyarrow.fs: the same code).

Publishing never shows half an artifact. On a local disk the version is
written into a hidden temporary folder and renamed into place (a rename fails
if the version exists, so two publishers cannot overwrite each other); on an
object store, where there is no rename, the manifest is written after every
other file and a version without a manifest does not exist for readers. Then
the `CURRENT` pointer is replaced in one write. Old versions beyond the
newest `keep` are removed (never the current one), so a rollback has
somewhere to go back to.

Loading reads each file's bytes once, checks their hashes (and the
signature) and only then hands those same bytes to the enrichment to
deserialise: nothing is unpickled before it is verified, and a file swapped
after the check is never read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.fs as pafs

from enricher.errors import EnricherError, redact

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class ArtifactError(EnricherError, RuntimeError):
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
    workflow: str | None = field(default=None)  # the training run that made it
    signature: str | None = field(default=None)

    def signed_payload(self) -> bytes:
        body = asdict(self)
        body.pop("signature", None)
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class VerifiedArtifact:
    manifest: Manifest
    blobs: dict[str, bytes]
    path: str


def version_dir(version: int) -> str:
    return f"v{version:06d}"


class Files:
    """The few file operations the store needs, on a local disk or an object
    store, through pyarrow.fs. Object-store credentials come from the usual
    environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...); the endpoint
    and region may ride in the URL: s3://bucket/prefix?endpoint_override=host:9000&scheme=http
    """

    def __init__(self, location: str | Path):
        text = str(location)
        if "://" in text:
            try:
                self.fs, base = pafs.FileSystem.from_uri(text)
            except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a bad URI
                raise ArtifactError(f"artifact store {redact(text)!r}: {exc}") from None
            self.local = isinstance(self.fs, pafs.LocalFileSystem)
        else:
            self.fs, base, self.local = pafs.LocalFileSystem(), str(Path(text).resolve()), True
        self.base = base.rstrip("/")
        self.location = redact(text)

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def read(self, path: str) -> bytes:
        try:
            with self.fs.open_input_stream(path) as fh:
                return fh.read()
        except FileNotFoundError:
            raise
        except OSError:
            if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise FileNotFoundError(path) from None
            raise

    def write(self, path: str, data: bytes) -> None:
        """Replace a file in one step: readers see the old bytes or the new ones."""
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        else:  # one PUT: the object appears whole or not at all
            with self.fs.open_output_stream(path) as fh:
                fh.write(data)

    def listing(self, path: str) -> list[pafs.FileInfo]:
        try:
            return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except FileNotFoundError:
            return []

    def delete_dir(self, path: str) -> None:
        try:
            self.fs.delete_dir(path)
        except FileNotFoundError:
            pass


class ArtifactStore:
    """Versioned, verified artifacts under a local directory or an object-store prefix."""

    def __init__(self, root: str | Path, signing_key: bytes | None = None, keep: int = 5):
        self.files = Files(root)
        self.root = root
        self.signing_key = signing_key
        self.keep = max(1, int(keep))

    def _dir(self, model_id: str, enrichment: str) -> str:
        return self.files.path(model_id, enrichment)

    def versions(self, model_id: str, enrichment: str) -> list[int]:
        """Published versions (a folder with a manifest), oldest first."""
        base = self._dir(model_id, enrichment)
        found = []
        for info in self.files.listing(base):
            m = _VERSION_DIR.match(info.base_name)
            if m and info.type == pafs.FileType.Directory and \
                    self.files.fs.get_file_info(f"{info.path}/{MANIFEST}").type == pafs.FileType.File:
                found.append(int(m.group(1)))
        return sorted(found)

    def manifests(self, model_id: str, enrichment: str) -> list[Manifest]:
        """Every published version's manifest, as written (not verified: for listing)."""
        out = []
        for version in self.versions(model_id, enrichment):
            try:
                raw = json.loads(self.files.read(f"{self._dir(model_id, enrichment)}/{version_dir(version)}/{MANIFEST}"))
                out.append(Manifest(**raw))
            except (ValueError, TypeError, FileNotFoundError):
                continue
        return out

    def current_version(self, model_id: str, enrichment: str) -> int | None:
        pointer = f"{self._dir(model_id, enrichment)}/{CURRENT}"
        try:
            text = self.files.read(pointer).decode("ascii", "replace").strip()
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
        workflow: str | None = None,
    ) -> Manifest:
        """Write a new version and make it current; returns its manifest."""
        base = self._dir(model_id, enrichment)
        for name in blobs:
            if not _FILE_NAME.match(name) or name == MANIFEST:
                raise ArtifactError(f"artifact file name {name!r} is not allowed")
        hashes = {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}
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
            workflow=workflow,
        )
        if self.signing_key:
            manifest.signature = hmac.new(self.signing_key, manifest.signed_payload(), "sha256").hexdigest()
        manifest_bytes = json.dumps(asdict(manifest), indent=2, sort_keys=True).encode()
        if self.files.local:
            self._publish_local(base, version, blobs, manifest_bytes)
        else:
            final = f"{base}/{version_dir(version)}"
            for name, data in blobs.items():
                self.files.write(f"{final}/{name}", data)
            self.files.write(f"{final}/{MANIFEST}", manifest_bytes)  # last: the version now exists
        self._point_current(base, version)
        self._prune(model_id, enrichment, version)
        return manifest

    def _publish_local(self, base: str, version: int, blobs: dict[str, bytes], manifest_bytes: bytes) -> None:
        import shutil
        import tempfile

        Path(base).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".publishing-", dir=base))
        try:
            for name, data in {**blobs, MANIFEST: manifest_bytes}.items():
                with open(tmp / name, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            # rename() of a directory fails if the target exists, so two
            # publishers racing for one version number cannot overwrite each other.
            os.rename(tmp, Path(base) / version_dir(version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _prune(self, model_id: str, enrichment: str, current: int) -> None:
        versions = self.versions(model_id, enrichment)
        for version in versions[:-self.keep]:
            if version != current:
                self.files.delete_dir(f"{self._dir(model_id, enrichment)}/{version_dir(version)}")

    def set_current(self, model_id: str, enrichment: str, version: int) -> Manifest:
        """Point CURRENT at an existing version after verifying it (rollback)."""
        if version not in self.versions(model_id, enrichment):
            kept = ", ".join(f"v{v}" for v in self.versions(model_id, enrichment)) or "none"
            raise ArtifactError(f"{model_id}/{enrichment} has no version {version} (kept: {kept})")
        artifact = self.load(model_id, enrichment, version)
        self._point_current(self._dir(model_id, enrichment), version)
        return artifact.manifest

    def _point_current(self, base: str, version: int) -> None:
        self.files.write(f"{base}/{CURRENT}", (version_dir(version) + "\n").encode())

    def load(self, model_id: str, enrichment: str, version: int | None = None) -> VerifiedArtifact:
        """Read and verify one version (the current one by default)."""
        if version is None:
            version = self.current_version(model_id, enrichment)
            if version is None:
                raise ArtifactError(f"no {enrichment} artifact for model {model_id!r}: train it first")
        path = f"{self._dir(model_id, enrichment)}/{version_dir(version)}"
        return verify(self.files, path, self.signing_key, expect=(model_id, enrichment, version))


def verify(files: Files, path: str, signing_key: bytes | None = None,
           expect: tuple[str, str, int] | None = None) -> VerifiedArtifact:
    """Read an artifact folder and check every file against its manifest."""
    try:
        raw = json.loads(files.read(f"{path}/{MANIFEST}"))
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
    present = {i.base_name for i in files.listing(path) if i.type == pafs.FileType.File} - {MANIFEST}
    if present != set(manifest.files):
        raise IntegrityError(f"{path}: files {sorted(present)} differ from the manifest's {sorted(manifest.files)}")
    blobs = {}
    for name, digest in manifest.files.items():
        if not _FILE_NAME.match(name):
            raise IntegrityError(f"{path}: manifest names an unsafe file {name!r}")
        data = files.read(f"{path}/{name}")
        if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), digest):
            raise IntegrityError(f"{path}/{name}: sha256 does not match the manifest (tampered or corrupted)")
        blobs[name] = data
    return VerifiedArtifact(manifest, blobs, path)
