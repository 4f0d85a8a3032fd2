"""User-facing errors.

A `ToolkitError` means the input is wrong (a missing file, a bad key, an impossible config), not
that the toolkit is broken. The CLI prints its message as one line and exits with status 2, with
no traceback. Every message says what is wrong and how to fix it.
"""


class ToolkitError(Exception):
    """Bad input from the user: shown as one clear message, never as a traceback."""


def check_choice(key: str, value, allowed) -> None:
    """`value` must be one of `allowed`; otherwise one line naming the nearest choice and all of them."""
    import difflib

    if value not in allowed:
        near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ToolkitError(f"unknown {key} '{value}'{hint}: choose one of {', '.join(map(str, allowed))}")
