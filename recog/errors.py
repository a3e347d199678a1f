"""The exceptions a user is meant to read: one sentence each, printed without a traceback."""


class RecogError(Exception):
    """An expected failure: the message is one sentence that names the thing and the fix. ``train.py``
    prints it without a traceback; anything else is a programming error and keeps its traceback."""


class ConfigError(RecogError, ValueError):
    """Bad input a user can fix: a path, a config value, a data set, a checkpoint that does not fit.

    Raise it before any collective call (or inside `dist.fail_together` / `dist.run_on_rank0`), so that
    every rank stops and none is left waiting for the others.
    """


class DataError(RecogError, RuntimeError):
    """Data that cannot be read, raised only where the user asked for strict reading (or a server stays down)."""


def check_number(key: str, value, whole: bool, least: float, above: bool) -> None:
    """A configured number, as one sentence when it is not one or out of bounds (`above`: strictly above `least`)."""
    kind = "a whole number" if whole else "a number"
    bound = f"above {least}" if above else f"at least {least}"
    is_number = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)
    if not is_number or value < least or (above and value == least):
        raise ConfigError(f"{key}={value} is not valid; give {kind} {bound}.")


def sentence(error: BaseException) -> str:
    """The sentence of an expected error. One raised in a data-loader worker reaches the training process
    re-raised by torch with the worker's traceback as its message; the sentence is that traceback's last line."""
    text = str(error).strip()
    if "Original Traceback" in text:
        return text.splitlines()[-1].split(": ", 1)[-1]
    return text
