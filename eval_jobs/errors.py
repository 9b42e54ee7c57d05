"""Typed errors of the evaluation jobs.

They subclass the project's ``BirkhoffError`` so that ``birkhoff eval`` reports
them the same way as the compressor's own errors (one line, exit status 2).
"""

from __future__ import annotations

from compressor.errors import BirkhoffError, ConfigError


class EvalError(BirkhoffError):
    """Base class of the evaluation jobs' errors."""


class DatasetError(EvalError, ValueError):
    """An annotation file, image or detections file is missing or malformed.

    ``file`` names the file; ``item`` the image or annotation concerned, when known.
    """

    def __init__(self, message: str, *, file: str | None = None, item: str | None = None):
        self.file = None if file is None else str(file)
        self.item = item
        self.detail = message
        where = [w for w in ((f"file {self.file}" if self.file else None), item) if w]
        super().__init__(f"{message} ({', '.join(where)})" if where else message)

    def __reduce__(self):  # keep the fields across Ray's pickling
        return (_rebuild_dataset_error, (type(self), self.detail, self.file, self.item))


def _rebuild_dataset_error(cls, message, file, item):
    return cls(message, file=file, item=item)


class DatasetChangedError(DatasetError):
    """A worker's copy of a dataset is not the one the driver planned with (its
    annotations hash differently)."""


class DatasetSpecError(EvalError, ConfigError):
    """A ``--dataset`` or ``--prompts`` value cannot be parsed."""


class ModelLoadError(EvalError, ValueError):
    """A model directory cannot be loaded as a SAM-family model."""
