"""Typed errors of the evaluation jobs.

They subclass the project's ``BirkhoffError`` so that ``birkhoff eval`` reports
them the same way as the compressor's own errors (one line, exit status 2).
"""

from __future__ import annotations

from compressor.errors import BirkhoffError, ConfigError, LocatedError


class EvalError(BirkhoffError):
    """Base class of the evaluation jobs' errors."""


class DatasetError(EvalError, LocatedError, ValueError):
    """An annotation file, image or detections file is missing or malformed.

    ``file`` names the file; ``item`` the image or annotation concerned, when known
    (shown as it is: "image 12", "annotation 7").
    """

    where_fields = ("file", "item")

    def __init__(self, message: str, *, file: str | None = None, item: str | None = None):
        super().__init__(message, file=None if file is None else str(file), item=item)

    def _show(self, name: str, value) -> str | None:
        if not value:
            return None
        return f"file {value}" if name == "file" else str(value)


class DatasetChangedError(DatasetError):
    """A worker's copy of a dataset is not the one the driver planned with (its
    annotations hash differently)."""


class DatasetSpecError(EvalError, ConfigError):
    """A ``--dataset`` or ``--prompts`` value cannot be parsed."""


class ModelLoadError(EvalError, ValueError):
    """A model directory cannot be loaded as a SAM-family model."""
