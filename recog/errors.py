"""The one exception type a user is meant to read."""


class ConfigError(ValueError):
    """Bad input a user can fix: a path, a config value, a data set.

    The message is one sentence that names the thing and the fix. ``train.py``
    prints it without a traceback. Raise it before any collective call, so that
    every rank stops on its own and none is left waiting for the others.
    """


class DataError(RuntimeError):
    """Data that cannot be read, raised only where the user asked for strict reading."""
