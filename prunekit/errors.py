"""One error family for what the user got wrong.

The CLI prints the message of a ``PrunekitError`` as one line and exits 2; any
other exception is a bug in prunekit and shows a traceback only with ``--debug``.
"""

from __future__ import annotations

from typing import Iterable


class PrunekitError(Exception):
    """Something the user can fix: the message says what was wrong and what to do."""


class ConfigError(PrunekitError):
    """A bad argument, option or config value."""


class DataError(PrunekitError):
    """Calibration or evaluation text that is missing or too short."""


class ModelError(PrunekitError):
    """A model that cannot be found, loaded or paired with another."""


class SchemaError(PrunekitError):
    """An artefact on disk written by an incompatible prunekit version."""


class HubError(PrunekitError):
    """The Hugging Face Hub refused or failed a request: the message says whether to log in, wait or change it."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest of ``choices`` to a misspelt ``word``, or ``""``."""
    import difflib

    hint = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else ""
