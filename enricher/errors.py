"""The errors this package raises on purpose, under one root.

`EnricherError` is something the user fixes, and its message says what: the
CLI prints it and exits 2, without a traceback. Any other exception is a bug:
it keeps its traceback and another exit code. Classes that were ValueError,
KeyError or RuntimeError before keep that base too, so callers that catch
those still do.

This module imports nothing of ours: every part of the package (models/
included, which knows nothing of Kafka or ClickHouse) may raise from it, and
redact what a message quotes.
"""

import re


class EnricherError(Exception):
    """A problem the user can fix; the message says what."""


class UserError(EnricherError):
    """A command used wrongly (an argument, a file that cannot be read)."""


class RequestError(EnricherError):
    """A request to fix: `field` names the part of the request at fault. The kind of
    error (this class or a subclass) says what went wrong; the HTTP layer maps kinds
    to status codes (http/api.py), the CLI prints the message."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def body(self) -> dict:
        out = {"error": str(self)}
        if self.field is not None:
            out["field"] = self.field
        return out


class NotFound(RequestError):
    """What the request names (a model, an inference) does not exist."""


class Conflict(RequestError):
    """A valid request the current state does not allow (e.g. explanations not serving yet)."""


class InvalidArgument(RequestError, ValueError):
    """A value given that cannot be used: a window, an end time, a feature, an option
    (`field`: which, when the caller names it)."""


class Unavailable(EnricherError, RuntimeError):
    """A service that may answer later: busy (HTTP 429), failing (5xx) or unreachable.
    Unlike a UserError, trying again may succeed (a training step is retried on it)."""


class BrokerUnavailable(EnricherError, RuntimeError):
    """No Kafka broker answers where the settings point (or the embedded one did not start)."""


def redact(text: str) -> str:
    """A URL or location as a message may quote it: no password (`user:***@`) and no key
    or token in its options (`secret_key=***`)."""
    text = re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", text)  # user:password@
    return re.sub(r"(secret_key|access_key|session_token)=[^&]*", r"\1=***", text)
