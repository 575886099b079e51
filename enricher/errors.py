"""Errors a user fixes: the CLI prints them without a traceback."""


class UserError(Exception):
    """Something the user must fix; the message says what."""
