"""A shard task checks the source it resolved against the sha256 the driver keyed the
commit under (issue 11 item 3): a source changed between planning and the worker's
read is refused with a typed error, and the task writes nothing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from compressor.config import HyperCompressionConfig
from compressor.errors import SourceChangedError
from compressor.sources import open_source
from workflows.payloads import CompressJob, ResumeRecordError, ShardResult, WorkUnit
from workflows.shard_task import run_shard
from workflows.sharding import plan_work_units
from workflows.store import open_store


def _job(src_path, store, sha):
    src = open_source(str(src_path))
    index = src.tensor_index()
    (shard,) = plan_work_units(index, 1)
    return CompressJob(
        model="tiny", source=str(src_path), source_sha256=sha, revision=None,
        config=HyperCompressionConfig(points=(1600,)).to_dict(), store=store.spec(), prefix="tiny/p/",
        unit=WorkUnit(shard.index, shard.count, tuple(shard.names), shard.stem, shard.names_hash),
        expected={i.name: (list(i.shape), i.dtype) for i in index}, backend="numba-cpu", log_level="WARNING")


def test_a_source_changed_after_planning_is_refused_and_nothing_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.randn(16, 32, generator=g) * 0.02}, str(path))
    planned = open_source(str(path)).source_hash()
    store = open_store(str(tmp_path / "store"))

    # same bytes: the shard and its resume record land
    result = run_shard(_job(path, store, planned))
    assert sorted(store.list("tiny/p/")) == sorted(["tiny/p/" + result.record.file,
                                                   f"tiny/p/_work/{result.names_hash}.json"])
    # the resume record read back is the result, typed and validated
    back = ShardResult.from_json(store.get_bytes(f"tiny/p/_work/{result.names_hash}.json"), "record")
    assert back == result
    with pytest.raises(ResumeRecordError, match="version"):
        ShardResult.from_json(b'{"version": 0}', "old-record")

    # the file is replaced (same names, shapes and dtypes, other values) after planning
    save_file({"a.weight": torch.randn(16, 32, generator=g) * 0.02}, str(path))
    other = tmp_path / "store2"
    store2 = open_store(str(other))
    with pytest.raises(SourceChangedError) as ei:
        run_shard(_job(path, store2, planned))
    assert str(path) in str(ei.value) and planned[:16] in str(ei.value)
    # nothing uploaded, no resume record
    assert store2.list("tiny/") == [] and not [p for p in other.rglob("*") if p.is_file()]
