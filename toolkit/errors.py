"""User-facing errors.

A `ToolkitError` means the input is wrong (a missing file, a bad key, an impossible config), not
that the toolkit is broken. The CLI prints its message as one line and exits with status 2, with
no traceback. Every message says what is wrong and how to fix it.
"""


class ToolkitError(Exception):
    """Bad input from the user: shown as one clear message, never as a traceback."""
