"""What the driver and its Ray tasks hand each other, typed.

* :class:`CompressJob`: one work unit (a set of tensors that becomes one file
  shard) for one ``run_shard`` task;
* :class:`ShardRecord`: a stored shard file (name, bytes, sha256);
* :class:`ShardResult`: what the task returns, which is also the resume record
  it stores under ``_work/<tensor-set hash>.json`` so that a later run skips the
  work; :meth:`ShardResult.from_json` validates one read back from the store.

Frozen dataclasses with a ``version``; Ray pickles them, the resume record is
JSON (``to_json`` / ``from_json``), and a record of another version or shape is
refused with :class:`ResumeRecordError` (the driver then recomputes the unit).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import WorkflowError

PAYLOAD_VERSION = 1


class ResumeRecordError(WorkflowError, ValueError):
    """A resume record that is not one this version wrote, or not for this work unit."""


@dataclass(frozen=True)
class WorkUnit:
    """A Ray work unit: the tensors one task compresses into one file shard."""

    index: int
    count: int
    names: tuple[str, ...]
    stem: str  # the shard file's name before the hash of its bytes (workflows.sharding)
    names_hash: str  # keys the resume record: any plan holding exactly these tensors resumes it


@dataclass(frozen=True)
class CompressJob:
    model: str
    source: str  # the zoo source URI: every worker resolves it itself
    source_sha256: str  # the commit key: a worker refuses a source with other bytes
    revision: str | None
    config: dict
    store: dict  # Store.spec()
    prefix: str
    unit: WorkUnit
    expected: dict[str, tuple[list[int], str]]  # tensor -> (shape, dtype) the driver planned with
    backend: str = "auto"
    cache_dir: str | None = None
    log_level: str = "INFO"
    cpus: int = 1
    version: int = PAYLOAD_VERSION


@dataclass(frozen=True)
class ShardRecord:
    file: str
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {"file": self.file, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class ShardResult:
    model: str
    unit_index: int
    names_hash: str
    config_hash: str
    codec_version: int
    record: ShardRecord
    tensor_meta: dict[str, dict]  # tensor -> its manifest entry
    stats: dict[str, Any] = field(default_factory=dict)
    version: int = PAYLOAD_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> "ShardResult":
        try:
            d = json.loads(raw)
            if not isinstance(d, dict) or d.get("version") != PAYLOAD_VERSION:
                raise ValueError(f"version {d.get('version') if isinstance(d, dict) else None!r}, "
                                 f"expected {PAYLOAD_VERSION}")
            rec = d["record"]
            record = ShardRecord(str(rec["file"]), int(rec["bytes"]), str(rec["sha256"]))
            meta = d["tensor_meta"]
            if not isinstance(meta, dict) or not all(isinstance(v, dict) for v in meta.values()):
                raise ValueError("tensor_meta must map tensor names to manifest entries")
            stats = d.get("stats", {})
            if not isinstance(stats, dict):
                raise ValueError("stats must be an object")
            return cls(str(d["model"]), int(d["unit_index"]), str(d["names_hash"]), str(d["config_hash"]),
                       int(d["codec_version"]), record, meta, stats)
        except (ValueError, KeyError, TypeError) as exc:
            raise ResumeRecordError(f"{where}: not a resume record of this version ({exc})") from None
