"""One error family for what the user got wrong.

The CLI prints the message of a ``PrunekitError`` as one line and exits 2; any
other exception is a bug in prunekit and shows a traceback only with ``--debug``.
"""


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
