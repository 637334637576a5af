"""Errors a user can cause; the CLI shows them as one line, without a traceback."""


class UserError(Exception):
    """Bad input (config, data, server, options) explained in one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (for one-line errors and warnings), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
