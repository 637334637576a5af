"""Errors a user can cause; the CLI shows them as one line, without a traceback."""


class UserError(Exception):
    """Bad input (config, data, server, options) explained in one line."""
