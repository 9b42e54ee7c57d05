"""Codec v2 tensors: encode/decode round trips, and malformed byte forms rejected with
typed errors that name the file and the tensor."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch

from compressor.codec_v2 import CodecV2Config, V2Tensor, encode_tensor
from compressor.codec_v2 import lattice as L
from compressor.codec_v2 import symbols as sy
from compressor.codec_v2.layout import MAGIC, arrays_crc, pack_parts
from compressor.errors import (ChecksumError, EntropyStreamError, FormatError, IndexRangeError, ManifestError,
                               NonFiniteTensorError, ScaleError, SizeLimitError, SymbolModelError,
                               TruncatedDataError, UnknownFormatError)

NAME = "encoder.layer.0.mlp.weight"
FILE = "shard-00001.bin"


@pytest.fixture(scope="module")
def tensor():
    rng = np.random.default_rng(0)
    w = (rng.laplace(0, 0.03, (96, 130))).astype(np.float32)
    w[7, 9] = 40.0  # escapes: far outside any model range
    w[50, 129] = -25.0
    w[60, 11] = 12.0
    cfg = CodecV2Config(block_pairs=1024)  # several blocks
    v = encode_tensor(w, cfg, name=NAME, kernels="numba-cpu")
    return w, v


def _forge(v, meta_changes=None, array_changes=None, fix_crc=True) -> bytes:
    """A byte form with fields replaced, the arrays' CRC recomputed (so that the
    semantic checks, not the checksum, must catch the lie)."""
    meta = v.meta()
    arrays = {k: np.array(a, copy=True) for k, a in v.arrays().items()}
    meta.update(meta_changes or {})
    for key, fn in (array_changes or {}).items():
        arrays[key] = fn(arrays[key])
    if fix_crc:
        meta["arrays_crc"] = arrays_crc(arrays)
    return pack_parts(meta, arrays)


def _load(blob):
    return V2Tensor.from_bytes(blob, file=FILE, name=NAME).decode("numba-cpu", file=FILE)


def _expect(exc_type, blob):
    with pytest.raises(exc_type) as ei:
        _load(blob)
    assert ei.value.file == FILE and ei.value.tensor == NAME
    assert FILE in str(ei.value) and NAME in str(ei.value)
    return ei.value


# -- round trips ------------------------------------------------------------------------------

def test_round_trip_bytes_and_parts(tensor):
    w, v = tensor
    assert v.n_blocks > 3 and v.esc_index.size >= 3
    blob = v.to_bytes()
    assert blob[:8] == MAGIC and v.nbytes == len(blob)
    back = V2Tensor.from_bytes(blob, file=FILE)
    assert back.to_bytes() == blob
    again = V2Tensor.from_parts(v.meta(), v.arrays())
    d = back.decode("numba-cpu")
    assert np.array_equal(d, again.decode("reference")) and d.dtype == np.float32 and d.shape == w.shape
    m, b = back.coords()
    steps = L.steps_f64(back.base, back.rel)
    m_ref, b_ref = L.encode_rows(w, steps)
    assert np.array_equal(m, m_ref) and np.array_equal(b, b_ref)  # the stream holds exactly the lattice points
    assert np.abs(d - w).max() <= steps.max() / np.sqrt(3) + 1e-6
    assert abs(d[7, 9] - 40.0) <= steps[7] / np.sqrt(3)  # the outlier keeps its own point


def test_streaming_and_parallel_decode_agree(tensor):
    _, v = tensor
    m, b = v.coords()
    rows = 0
    for r0, r1, mk, bk in v.iter_blocks():
        assert r0 == rows and np.array_equal(mk, m[r0:r1]) and np.array_equal(bk, b[r0:r1])
        rows = r1
    assert rows == v.rows
    m2, b2 = v.coords(workers=3)
    assert np.array_equal(m, m2) and np.array_equal(b, b2)


def test_backends_write_identical_bytes_and_inputs_stay_untouched():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((33, 21)).astype(np.float32)
    keep = w.copy()
    a = encode_tensor(w, name="t", kernels="reference").to_bytes()
    b = encode_tensor(w, name="t", kernels="numba-cpu").to_bytes()
    assert a == b and np.array_equal(w, keep)
    t = torch.from_numpy(keep.copy())
    assert encode_tensor(t, name="t").to_bytes() == a and torch.equal(t, torch.from_numpy(keep))


def test_dtypes_shapes_and_roles():
    rng = np.random.default_rng(2)
    bf = torch.from_numpy(rng.standard_normal((8, 16, 3, 3)).astype(np.float32)).to(torch.bfloat16)
    v = encode_tensor(bf, name="conv.weight")
    assert v.dtype == "bfloat16" and v.shape == (8, 16, 3, 3) and v.rows == 8 and v.cols == 144
    assert v.decode().shape == (8, 16, 3, 3)
    emb = encode_tensor(rng.standard_normal((50, 12)), name="embeddings.word_embeddings.weight")
    lin = encode_tensor(rng.standard_normal((50, 12)), name="dense.weight")
    assert emb.role == "embedding" and lin.role == "linear" and emb.q == pytest.approx(3 * lin.q)
    one_d = encode_tensor(np.arange(7, dtype=np.float64), name="v", role="linear")
    assert one_d.rows == 1 and np.abs(one_d.decode() - np.arange(7)).max() < 7
    assert encode_tensor(np.zeros((4, 4), np.float32), name="z").decode().max() == 0


def test_non_finite_and_unsupported_inputs():
    w = np.ones((4, 4), np.float32)
    w[1, 2] = np.nan
    with pytest.raises(NonFiniteTensorError) as ei:
        encode_tensor(w, name="bad.weight")
    assert ei.value.tensor == "bad.weight"
    with pytest.raises(TypeError):
        encode_tensor(np.ones((4, 4), np.int32), name="i")
    with pytest.raises(ValueError):
        encode_tensor(np.ones(1, np.float32), name="one")


# -- malformed inputs: each rejected with a typed error naming file and tensor --------------------

def test_truncated_block(tensor):
    _, v = tensor
    _expect(TruncatedDataError, v.to_bytes()[:-4])


def test_truncated_header(tensor):
    _, v = tensor
    blob = v.to_bytes()
    with pytest.raises(TruncatedDataError) as ei:
        V2Tensor.from_bytes(blob[:40], file=FILE, name=NAME)
    assert ei.value.file == FILE and ei.value.tensor == NAME


def test_trailing_bytes(tensor):
    _, v = tensor
    _expect(TruncatedDataError, v.to_bytes() + b"\0\0\0\0")


def test_bad_magic(tensor):
    _, v = tensor
    _expect(UnknownFormatError, b"NOTV2TNS" + v.to_bytes()[8:])


def test_header_bit_flip(tensor):
    _, v = tensor
    blob = bytearray(v.to_bytes())
    blob[20] ^= 0x01
    _expect(ChecksumError, bytes(blob))


def test_unknown_version_and_coder(tensor):
    _, v = tensor
    _expect(UnknownFormatError, _forge(v, {"version": 2}))
    _expect(UnknownFormatError, _forge(v, {"coder": "zstd"}))
    _expect(UnknownFormatError, _forge(v, {"lattice": "z2"}))


def test_header_not_json(tensor):
    _, v = tensor
    header = b"{not json"
    blob = MAGIC + struct.pack("<II", len(header), zlib.crc32(header)) + header
    _expect(ManifestError, blob)


def test_lying_symbol_table_wrong_total(tensor):
    _, v = tensor

    def more(f):
        f[0] += 1
        return f

    err = _expect(SymbolModelError, _forge(v, array_changes={"model_m": more}))
    assert "sum" in str(err)


def test_lying_symbol_table_zero_frequency(tensor):
    _, v = tensor

    def zero(f):
        f[-1] += f[0]
        f[0] = 0
        return f

    _expect(SymbolModelError, _forge(v, array_changes={"model_b": zero}))


def test_lying_symbol_table_consistent_but_wrong(tensor):
    """A table that passes every static check (>= 1, sums to 2**16) but is not the one
    the stream was coded with: the decoded symbols' CRC (or the stream end) catches it."""
    _, v = tensor

    def shift(f):
        i = int(np.argmax(f))
        j = (i + 1) % f.size
        moved = f[i] // 3
        f[i] -= moved
        f[j] += moved
        return f

    _expect((ChecksumError, EntropyStreamError), _forge(v, array_changes={"model_m": shift}))


def test_symbol_table_range_outside_caps(tensor):
    _, v = tensor
    _expect(SymbolModelError, _forge(v, {"model_m_lo": -100000}))
    _expect(SymbolModelError, _forge(v, {"model_b_n": 1}))


def test_corrupted_block_word(tensor):
    _, v = tensor
    blob = bytearray(v.to_bytes())
    blob[-9] ^= 0x40  # inside the last block's words
    _expect(ChecksumError, bytes(blob))


def test_forged_block_with_matching_word_crc(tensor):
    """A block whose words were replaced and whose word CRC was recomputed: the ANS end
    check or the decoded symbols' CRC still rejects it."""
    _, v = tensor
    offs = np.concatenate([[0], np.cumsum(v.block_words.astype(np.int64))])

    def flip(p):
        p[offs[1] + 1] ^= np.uint32(0x00F00F00)
        return p

    arrays = {k: np.array(a, copy=True) for k, a in v.arrays().items()}
    arrays["payload"] = flip(arrays["payload"])
    crc = np.array(arrays["block_crc"], copy=True)
    crc[1] = zlib.crc32(arrays["payload"][offs[1]:offs[2]].astype("<u4").tobytes())
    _expect((ChecksumError, EntropyStreamError), _forge(v, array_changes={"payload": flip, "block_crc": lambda _: crc}))


def test_block_words_disagree_with_payload(tensor):
    _, v = tensor

    def grow(wd):
        wd[0] += 1
        wd[1] -= 1
        return wd

    _expect((ChecksumError, EntropyStreamError), _forge(v, array_changes={"block_words": grow}))

    def lie(wd):
        wd[0] += 5
        return wd

    _expect(FormatError, _forge(v, array_changes={"block_words": lie}))


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0, -1.0])
def test_scale_not_positive_finite(tensor, bad):
    _, v = tensor

    def put(rel):
        rel[5] = bad
        return rel

    err = _expect(ScaleError, _forge(v, array_changes={"rel": put}))
    assert "row 5" in str(err)


@pytest.mark.parametrize("base", [float("nan"), 0.1, -0.5, 1e-45, 0.0])
def test_base_invalid(tensor, base):
    _, v = tensor
    blob = _forge(v, {"base": base}) if base == base else _forge(v, {"base": 1e400})  # json: no NaN literal
    _expect((ScaleError, ManifestError), blob)


def test_escape_value_inside_model_range(tensor):
    """Code out of range: an escape must hold a coordinate its model cannot code."""
    _, v = tensor
    _expect(IndexRangeError, _forge(v, array_changes={"esc_value": lambda a: np.where(np.arange(a.size) == 0, 0, a)
                                                     .astype(np.int32)}))


def test_escape_positions_out_of_range_or_unsorted(tensor):
    _, v = tensor
    n = 2 * v.rows * v.pairs
    _expect(IndexRangeError, _forge(v, array_changes={"esc_index": lambda a: np.where(np.arange(a.size) == a.size - 1,
                                                                                       n, a).astype(np.int64)}))
    _expect(IndexRangeError, _forge(v, array_changes={"esc_index": lambda a: a[::-1].copy()}))


def test_escape_list_disagrees_with_stream(tensor):
    _, v = tensor
    _expect(EntropyStreamError, _forge(v, array_changes={"esc_index": lambda a: a + 2}))


def test_escape_value_beyond_cap(tensor):
    _, v = tensor
    _expect(IndexRangeError, _forge(v, array_changes={"esc_value": lambda a: np.full_like(a, 2**31 - 1)}))


def test_declared_sizes(tensor):
    _, v = tensor
    _expect(SizeLimitError, _forge(v, {"shape": [2**20, 2**20]}))  # refused before any allocation
    _expect(ManifestError, _forge(v, {"n_blocks": v.n_blocks + 1}))
    _expect(ManifestError, _forge(v, {"block_rows": 0}))
    _expect(TruncatedDataError, _forge(v, {"shape": [v.rows + 1, v.cols]}))  # one more row scale than stored
    # more columns than coded: the blocks' streams end early
    _expect((EntropyStreamError, ChecksumError), _forge(v, {"shape": [v.rows, v.cols + 2]}))
    _expect(ManifestError, _forge(v, {"dtype": "int8"}))
    _expect(ManifestError, _forge(v, {"q": "0.1"}))
    _expect(SizeLimitError, _forge(v, {"n_escapes": 10**9}))


def test_arrays_crc_catches_a_flipped_scale(tensor):
    _, v = tensor
    arrays = v.arrays()
    blob = bytearray(v.to_bytes())
    hlen = struct.unpack("<I", blob[8:12])[0]
    blob[16 + hlen + 3] ^= 0x01  # a byte of the row scales
    assert arrays["rel"].size > 2
    _expect(ChecksumError, bytes(blob))


def test_from_parts_checks_array_shapes_and_dtypes(tensor):
    _, v = tensor
    arrays = dict(v.arrays())
    arrays["rel"] = arrays["rel"].astype(np.float32)
    with pytest.raises(ManifestError):
        V2Tensor.from_parts(v.meta(), arrays, file=FILE)
    arrays = dict(v.arrays())
    arrays["payload"] = arrays["payload"][:-1]
    with pytest.raises(ManifestError):
        V2Tensor.from_parts(v.meta(), arrays, file=FILE)


def test_symbol_model_builder():
    rng = np.random.default_rng(3)
    vals = np.round(rng.laplace(0, 4, 50000)).astype(np.int64)
    vals[:3] = [3000, -5000, 700]
    m = sy.build_model(vals)
    m.validate()
    sym, esc = sy.to_symbols(vals, m)
    assert esc[:3].all() and not esc[3:].any() and sym.max() == m.escape
    # the coded size is close to the ideal entropy
    c = np.bincount(sym, minlength=m.n)
    p = c[c > 0] / c.sum()
    ideal = float(-(c[c > 0] * np.log2(p)).sum())
    assert m.cost_bits(c) <= ideal * 1.01 + 64
    assert json.dumps(int(m.lo))
