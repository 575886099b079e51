"""Time windows as users write them: `--window 1h`, `--end 2026-12-01T10:00:00Z`.

Every report over a recent window (drift, global importance, and the label-driven
reports to come) reads its window here, so each takes the same forms and says
the same thing about a form it does not take. Imports nothing of ours but the
error root: config.py validates ENRICHER_DRIFT_WINDOW with it at start-up.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from enricher.errors import InvalidArgument

_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_window(text: str) -> float:
    """'30m', '1h', '7d' -> seconds."""
    match = _WINDOW.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise InvalidArgument(f"window {text!r}: write a positive number and a unit, e.g. 30m, 1h, 7d "
                              "(s, m, h, d or w)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_end(text) -> float | None:
    """The window's end: ISO-8601 (no offset means UTC) or epoch seconds; None: now."""
    if text is None or text == "":
        return None
    try:
        return float(text)
    except (TypeError, ValueError):
        pass
    try:
        moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(f"end {text!r}: write an ISO-8601 time (2026-12-01T10:00:00Z) "
                              "or epoch seconds") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
