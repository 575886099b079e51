"""Where a model's reference data and model file may come from when a remote caller names them.

Through the API (`PUT /models/{id}`) a caller names a location the worker
then reads. Left open, that is a way to make the worker read any file it can
(another model's reference, its own secrets as a "CSV") or call any host (an
object-store URL carrying `endpoint_override=HOST:PORT&scheme=http` turned
the worker into a port scanner). So, for locations from the API:

- an object-store URL is `s3://BUCKET/KEY` and nothing more: no query, no
  port, no credentials, no `..` or %-escapes in the key; the endpoint,
  scheme and region are the configured
  ones (ENRICHER_OBJECT_STORE_ENDPOINT, _SCHEME, _REGION, else the options of
  an s3:// ENRICHER_ARTIFACT_STORE), added here, never the caller's;
- any other URL scheme (file://, hdfs://, gs://, http://...) is refused;
- a local path must be absolute and lie, once the operating system has
  resolved every link (realpath), under a directory of
  ENRICHER_REFERENCE_ROOTS (default: none, so no local path); the resolved
  path is what is registered and read, not the caller's spelling.

Refusals say "not allowed" and what is allowed, never whether the file or
host exists. The CLI (`enricher models register`) is the operator's own
shell on the machine and takes any path or URL.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

from enricher.errors import EnricherError

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_STORE_OPTIONS = ("endpoint_override", "scheme", "region")


class LocationRefused(EnricherError, ValueError):
    """A location a remote caller may not name; the message says what is allowed."""


@dataclass(frozen=True)
class Locations:
    roots: tuple[str, ...]
    store_options: str   # query string pyarrow.fs reads: endpoint_override=...&scheme=...&region=...

    @classmethod
    def from_settings(cls, settings) -> "Locations":
        roots = tuple(os.path.realpath(r) for r in settings.reference_roots.split(os.pathsep) if r.strip())
        options = {}
        artifact = urlsplit(settings.artifact_store_url or "")
        if artifact.scheme == "s3":
            options = {k: v for k, v in parse_qsl(artifact.query) if k in _STORE_OPTIONS}
        for key, value in (("endpoint_override", settings.object_store_endpoint),
                           ("scheme", settings.object_store_scheme), ("region", settings.object_store_region)):
            if value:
                options[key] = value
        return cls(roots, urlencode(options))

    def resolve(self, location: str, field: str) -> str:
        """The location to register and read for what a remote caller named in `field`."""
        if "://" in location or location.lower().startswith(("s3:", "file:")):
            return self._object(location, field)
        return self._local(location, field)

    def _object(self, location: str, field: str) -> str:
        parts = urlsplit(location)
        allowed = (f"{field}: not allowed: through the API give s3://BUCKET/KEY in the configured object store "
                   "(no endpoint, scheme, port or credentials of its own)")
        if parts.scheme != "s3":
            raise LocationRefused(allowed)
        if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc \
                or not _BUCKET.match(parts.netloc or ""):
            raise LocationRefused(allowed)
        key = parts.path
        if not key.startswith("/") or len(key) < 2 or any(seg in ("", ".", "..") for seg in key[1:].split("/")) \
                or any(ord(c) < 32 or c in "%\\" for c in key):
            # pyarrow decodes %-escapes in the URL it is given: no escapes, so the key it
            # reads is the key checked here
            raise LocationRefused(allowed)
        return f"s3://{parts.netloc}{key}" + (f"?{self.store_options}" if self.store_options else "")

    def _local(self, location: str, field: str) -> str:
        if not self.roots:
            raise LocationRefused(f"{field}: not allowed: local paths are not read through the API here "
                                  "(ENRICHER_REFERENCE_ROOTS names no directory); give s3://BUCKET/KEY, or "
                                  "register from the CLI")
        if "\0" in location or not os.path.isabs(location):
            raise LocationRefused(f"{field}: not allowed: give an absolute path under ENRICHER_REFERENCE_ROOTS")
        real = os.path.realpath(location)
        for root in self.roots:
            if os.path.commonpath([real, root]) == root:
                return real
        raise LocationRefused(f"{field}: not allowed: the path is not under ENRICHER_REFERENCE_ROOTS")
