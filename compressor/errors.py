"""Typed errors. Every error about data names the file and the tensor it concerns."""

from __future__ import annotations


class BirkhoffError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(BirkhoffError, ValueError):
    """A configuration value is invalid."""


class BackendUnavailableError(BirkhoffError, RuntimeError):
    """An explicitly requested backend cannot run here."""


class LocatedError(BirkhoffError):
    """An error about a place: a message plus named location fields (a file and a
    tensor, a file and a dataset item, a store key...).

    A subclass lists its fields in ``where_fields``; each becomes an attribute (None
    when not given) and is passed by keyword only. The message is ``detail`` followed
    by the shown fields in brackets (``_show`` decides how a field reads, or hides it).
    Pickling (Ray moves errors between processes) keeps every field."""

    where_fields: tuple[str, ...] = ()

    def __init__(self, message: str, **where):
        unknown = sorted(set(where) - set(self.where_fields))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no location field {', '.join(unknown)}")
        self.detail = message
        for name in self.where_fields:
            setattr(self, name, where.get(name))
        shown = [s for s in (self._show(n, getattr(self, n)) for n in self.where_fields) if s]
        super().__init__(f"{message} ({', '.join(shown)})" if shown else message)

    def _show(self, name: str, value) -> str | None:
        return None if value is None else f"{name} {value}"

    def __reduce__(self):  # keep the fields across Ray / pickling boundaries
        return (_rebuild, (type(self), self.detail, {n: getattr(self, n) for n in self.where_fields}))


def _rebuild(cls, message, where):
    return cls(message, **where)


class _Located(LocatedError):
    """An error about a file and, where known, a tensor in it."""

    where_fields = ("file", "tensor")

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        super().__init__(message, file=None if file is None else str(file), tensor=tensor)

    def _show(self, name: str, value) -> str | None:
        if name == "tensor" and value is not None:
            shown = repr(value)
            # a name can be megabytes long in a malformed file: the message shows its start
            return f"tensor {shown if len(shown) <= 300 else shown[:300] + '...'}"
        return super()._show(name, value)


class SourceError(_Located, ValueError):
    """A source checkpoint cannot be read or holds data we refuse (NaN/Inf, pickles)."""


class SourceChangedError(SourceError):
    """A source's bytes are not those a plan or a commit key was made from (its sha256 differs)."""


class NonFiniteTensorError(SourceError):
    """A source tensor holds NaN or Inf."""


class FormatError(_Located, ValueError):
    """A compressed checkpoint is malformed. Subclasses say how."""


class UnknownFormatError(FormatError):
    """Format name or version this build does not know."""


class ManifestError(FormatError):
    """manifest.json is missing, unparsable, or inconsistent."""


class MissingTensorError(FormatError):
    """A tensor the manifest lists is absent from its shard, or a shard is missing."""


class DuplicateTensorError(FormatError):
    """A tensor name appears twice."""


class UnexpectedTensorError(FormatError):
    """A shard holds a tensor the manifest does not list."""


class DTypeMismatchError(FormatError):
    """A stored tensor's dtype or shape differs from what the manifest declares."""


class PackedLengthError(FormatError):
    """The packed index stream length is not ceil(n * bits / 8)."""


class IndexRangeError(FormatError):
    """A stored index is at or above U * (K + 1)."""


class ChecksumError(FormatError):
    """The sha256 of a tensor's bytes differs from the manifest."""


class SizeLimitError(FormatError):
    """A declared size exceeds the loader's cap; nothing was allocated."""


class TruncatedDataError(FormatError):
    """A shard is shorter than its header declares, or has trailing bytes."""


class MissingFileError(MissingTensorError):
    """A file the manifest lists (a shard or a copied architecture file) is absent."""


class ShardHeaderError(FormatError):
    """A shard's safetensors header is malformed (not JSON, bad dtype, shape or offsets)."""


class DestinationError(_Located, ValueError):
    """A destination cannot be written: its parent is missing, a file or not
    writable, or it overlaps the source. Checked before any work starts."""


class CheckpointExistsError(DestinationError, FileExistsError):
    """Something exists at the destination and is not replaced: overwrite was not
    asked, or what is there is not a Birkhoff checkpoint / a regular file."""


class OutOfRangeTensorError(SourceError):
    """A source tensor's values are too large for the codec's float64 geometry."""


# -- codec v2 (entropy-coded lattice tensors, compressor/codec_v2/) -------------------

class SymbolModelError(FormatError):
    """A v2 tensor's symbol model (frequency table) is invalid: a zero frequency, a
    wrong total, a range outside the caps."""


class EntropyStreamError(FormatError):
    """A v2 tensor's entropy-coded block does not decode to exactly its declared
    symbols (words left over, the coder's own checks), or its escapes disagree with it."""


class ScaleError(FormatError):
    """A v2 tensor's step (float32 base or float16 row scale) is NaN, infinite, zero,
    negative or subnormal."""


class CheckpointURIError(_Located, ValueError):
    """A checkpoint is named by a URI (``s3://``, ``models:/``) that no installed
    resolver handles, or whose resolver cannot be loaded (``compressor.uris``)."""
