"""User-facing errors: one line each, naming the file and the layer/field at fault.

The CLI prints ``str(error)`` and exits with code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class LayerdiffError(Exception):
    """A problem with the user's input (file, flag, model) rather than with layerdiff."""

    exit_code = 2


class ModelFormatError(LayerdiffError):
    """A prototxt, caffemodel or saved trace that cannot be read or is inconsistent."""


class UnsupportedError(LayerdiffError):
    """A layer type or parameter value the engine does not implement."""


class InputSpecError(LayerdiffError):
    """An ``--input``/``--shape`` value that does not parse or does not fit the model."""


def layer_error(cls: type[LayerdiffError], layer_name: str, layer_type: str, msg: str):
    """Build an error that names the layer and its type, the way every engine error should."""
    return cls(f"layer '{layer_name}' ({layer_type}): {msg}")
