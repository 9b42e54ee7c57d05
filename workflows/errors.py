"""Typed errors of the workflow (the compressor's own live in compressor.errors)."""

from __future__ import annotations

from compressor.errors import BirkhoffError, LocatedError


class WorkflowError(BirkhoffError, RuntimeError):
    """A zoo run cannot go on for one model (the message says which and why)."""


class ZooError(BirkhoffError, ValueError):
    """The zoo file is invalid; the message names the file and the model."""


class StoreError(LocatedError, RuntimeError):
    """An object store operation failed for a reason retrying will not fix
    (access denied, no such bucket, bad URI). Never carries credentials.
    ``key`` is the object's key; the message already names its URL."""

    where_fields = ("key",)

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message, key=key)

    def _show(self, name: str, value) -> str | None:
        return None  # the message says where (a redacted URL); the key is for callers


class TransientStoreError(StoreError):
    """A store operation failed in a way that may pass on retry (connection
    refused or reset, timeouts, 5xx, throttling, checksum mismatch in flight)."""


class ChecksumMismatchError(TransientStoreError):
    """What the store holds after an upload differs from what was sent."""


class ConditionFailedError(StoreError):
    """A conditional write or delete did not apply: the object was not in the state
    the caller required (absent, or at a given ETag). Another writer got there first."""


class CommitLeaseError(WorkflowError):
    """The commit lease of a checkpoint could not be taken in time, or was lost
    (taken over by another run after its deadline): this run commits nothing."""


class NotCommittedError(StoreError):
    """The key holds no committed checkpoint (no manifest.json): staging objects
    of an unfinished run are never readable as a checkpoint."""


class CheckpointChangedError(WorkflowError):
    """A committed checkpoint is not the commit a reader was pointed at (its manifest's
    sha256 differs): it was replaced meanwhile."""


class TrackingUnavailableError(WorkflowError):
    """The MLflow tracking server does not answer: the run stops before it starts work."""
