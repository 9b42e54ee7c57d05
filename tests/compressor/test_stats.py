"""The one statistics helper (compressor/stats.py): a checkpoint in memory and the
manifest it is saved under count the same tensors, parameters and error."""

from __future__ import annotations

import pytest
import torch

from compressor import format as fmt
from compressor.checkpoint import compress
from compressor.config import HyperCompressionConfig
from compressor.stats import entry_stats, manifest_stats, size_ratio, tally


def test_entries_and_their_manifest_give_the_same_counts(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {f"l{i}.weight": torch.randn(32, 48, generator=g) * 0.02 for i in range(3)}
    sd["l0.bias"] = torch.randn(32, generator=g)  # small: stays raw
    sd["steps"] = torch.arange(5)  # non-float: stays raw
    ck = compress(sd, HyperCompressionConfig(points=(1600,)), backend="reference")
    ck.save(tmp_path / "ck")
    mem = entry_stats(ck.entries.values())
    disk = manifest_stats(fmt.read_manifest(tmp_path / "ck", fmt.LoadLimits()))
    assert mem["tensors"] == disk["tensors"] == 5
    assert mem["raw_tensors"] == disk["raw_tensors"] == 2
    assert mem["params"] == disk["params"] == 3 * 32 * 48 + 32 + 5
    assert mem["compressed_params"] == disk["compressed_params"] == 3 * 32 * 48
    assert mem["abs_error_sum"] > 0
    assert disk["abs_error_sum"] == pytest.approx(mem["abs_error_sum"], rel=1e-12)
    assert disk["mae"] == pytest.approx(mem["abs_error_sum"] / mem["params"], rel=1e-12)
    assert ck.stats()["mae"] == mem["mae"]


def test_raw_tensors_count_zero_error_and_empty_is_zero():
    st = tally([(10, False, 2.0), (30, True, 99.0)])
    assert st["abs_error_sum"] == 2.0 and st["mae"] == 2.0 / 40
    assert tally([])["mae"] == 0.0
    assert size_ratio(100, 25) == 4.0 and size_ratio(100, 0) == 0.0
