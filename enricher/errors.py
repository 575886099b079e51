"""The errors this package raises on purpose, under one root.

`EnricherError` is something the user fixes, and its message says what: the
CLI prints it and exits 2, without a traceback. Any other exception is a bug:
it keeps its traceback and another exit code. Classes that were ValueError,
KeyError or RuntimeError before keep that base too, so callers that catch
those still do.

This module imports nothing: every part of the package (models/ included,
which knows nothing of Kafka or ClickHouse) may raise from it.
"""


class EnricherError(Exception):
    """A problem the user can fix; the message says what."""


class UserError(EnricherError):
    """A command used wrongly (an argument, a file that cannot be read)."""


class InvalidArgument(EnricherError, ValueError):
    """A value given that cannot be used: a window, an end time, a feature, an option."""


class BrokerUnavailable(EnricherError, RuntimeError):
    """No Kafka broker answers where the settings point (or the embedded one did not start)."""
