"""The one exception type for bad input: the CLI prints its message as one line and exits 2."""


class AqError(Exception):
    """A problem with what the user gave (a scheme, a budget, a path, data). Message: one line."""
