"""User-facing errors: one clear line, no traceback (the CLI prints them and exits non-zero)."""


class LccError(Exception):
    """An error caused by the user's input (model, options, paths), reported as a single line."""

    exit_code = 2


class RefusedError(LccError):
    """The compiler cannot prove a rewrite equivalent and refuses, naming the site."""

    exit_code = 3


class LccWarning(UserWarning):
    """Something the user asked for that lcc does differently than its words say (the CLI prints one line)."""
