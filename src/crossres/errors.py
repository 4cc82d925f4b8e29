"""Errors a user can act on. The CLI prints any ``CrossresError`` as one line naming the
problem (and the command that fixes it) and exits with status 2, without a traceback; every
other exception is a bug and keeps its traceback."""

from __future__ import annotations


class CrossresError(Exception):
    """Bad input or a missing prerequisite: the message alone tells the user what to do."""


class NotPreparedError(CrossresError, FileNotFoundError):
    """A derived artefact (fetched faces, CR weights, a classification head, a query manifest)
    has not been built yet; the message names the command that builds it."""


class ConfigValueError(CrossresError, ValueError):
    """A value the user configured is out of its range or unknown (an attack knob, a list of
    resolutions, a model name); the message names the parameter and the value given."""
