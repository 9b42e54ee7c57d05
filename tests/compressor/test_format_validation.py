"""The compressed-checkpoint format: a clean round trip, then malformed checkpoints,
each refused with its own typed error naming the file and the tensor."""

from __future__ import annotations

import json
import os
import struct
import threading
import tracemalloc

import numpy as np
import pytest
import torch

from compressor import format as fmt
from compressor import quant_primitives as qp
from compressor.codec import CODEC_VERSION, CompressedTensor, compress_tensor
from compressor.config import HyperCompressionConfig
from compressor.errors import (
    ChecksumError,
    ConfigError,
    DTypeMismatchError,
    DuplicateTensorError,
    FormatError,
    IndexRangeError,
    ManifestError,
    MissingFileError,
    MissingTensorError,
    PackedLengthError,
    ShardHeaderError,
    SizeLimitError,
    TruncatedDataError,
    UnexpectedTensorError,
    UnknownFormatError,
)

CFG = HyperCompressionConfig(points=(1225,))
W = "encoder.layers.0.fc1.weight"  # 2-D fp32, odd columns: rows layout, padded
B = "encoder.layers.0.norm.weight"  # bf16, flat layout
I = "encoder.position_ids"  # int64: raw
S0 = "shard-00000.safetensors"
S1 = "shard-00001.safetensors"
CONFIG_JSON = b'{"model_type": "sam", "hidden_size": 32}\n'


@pytest.fixture(scope="module")
def entries():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 33, generator=g) * 0.02
    b = (torch.randn(2, 3, 7, generator=g) * 0.02).to(torch.bfloat16)
    i = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    es = {
        W: compress_tensor(W, w, CFG, backend="reference"),
        B: compress_tensor(B, b, CFG, backend="reference"),
        I: compress_tensor(I, i, CFG, backend="reference"),
    }
    assert not es[W].raw and es[W].layout == "rows" and es[W].pad
    assert not es[B].raw and es[B].layout == "flat" and es[B].dtype == "bfloat16"
    assert es[I].raw
    return es


class Ckpt:
    """A checkpoint's parts before writing, so a test can spoil one part and write."""

    def __init__(self, directory, entries):
        self.dir = str(directory)
        self.entries = entries
        self.stored = {n: fmt.stored_tensor(e) for n, e in entries.items()}
        sizes = {n: t.numel() * t.element_size() for n, t in self.stored.items()}
        self.plan = fmt.plan_shards(sizes, max_shard_bytes=sizes[W])
        assert self.plan == {S0: [W], S1: [B, I]}
        shard_of = {n: s for s, names in self.plan.items() for n in names}
        self.manifest = {
            "format": fmt.FORMAT_NAME,
            "format_version": fmt.FORMAT_VERSION,
            "producer": {"name": "birkhoff", "version": "0.1.0"},
            "codec_version": CODEC_VERSION,
            "config": CFG.to_dict(),
            "source": {"kind": "test", "uri": "memory://"},
            "extra_files": {},
            "shards": {},
            "tensors": {n: fmt.manifest_entry(e, shard_of[n], self.stored[n]) for n, e in entries.items()},
        }

    def path(self, name):
        return os.path.join(self.dir, name)

    def write(self, manifest_text: str | None = None):
        """Write shards and the config file with the real writers, then the manifest
        verbatim (no validation: the point is to write bad ones)."""
        for shard, names in self.plan.items():
            rec = fmt.write_shard(self.dir, shard, {n: self.stored[n] for n in names})
            self.manifest["shards"][shard] = {"bytes": rec["bytes"], "sha256": rec["sha256"]}
        src = os.path.join(self.dir, "..", "src-config.json")
        with open(src, "wb") as f:
            f.write(CONFIG_JSON)
        self.manifest["extra_files"]["config.json"] = fmt.copy_extra_file(src, self.dir, "config.json")
        self.write_manifest_text(manifest_text)

    def write_manifest_text(self, text: str | None = None):
        if text is None:
            text = json.dumps(self.manifest, sort_keys=True, indent=1)
        with open(self.path(fmt.MANIFEST_NAME), "w") as f:
            f.write(text)

    def refresh_shard(self, shard):
        """Make the manifest agree with a shard file edited by hand (bytes, sha256)."""
        with open(self.path(shard), "rb") as f:
            data = f.read()
        import hashlib

        self.manifest["shards"][shard] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.write_manifest_text()

    def load(self, limits=fmt.LoadLimits(), names=None, verify=True):
        m = fmt.read_manifest(self.dir, limits)
        return fmt.load_stored_tensors(self.dir, m, names=names, limits=limits, verify=verify)


@pytest.fixture
def ck(tmp_path, entries):
    d = tmp_path / "ckpt"
    d.mkdir()
    return Ckpt(d, entries)


def expect(exc, fn, *, file=None, tensor=None, match=None):
    """``fn()`` raises exactly ``exc``, and the error names ``file`` and ``tensor``."""
    with pytest.raises(FormatError) as info:
        fn()
    err = info.value
    assert type(err) is exc, f"expected {exc.__name__}, got {type(err).__name__}: {err}"
    msg = str(err)
    if file is not None:
        assert err.file is not None and os.path.basename(err.file) == file, msg
        assert err.file in msg
    if tensor is not None:
        assert err.tensor == tensor and repr(tensor) in msg, msg
    if match is not None:
        assert match in msg, msg
    return err


def split_shard(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_shard(path, header_text: str, body: bytes):
    h = header_text.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + body)


# -- the clean path -------------------------------------------------------------------

def test_round_trip(ck, entries):
    ck.write()
    m = fmt.read_manifest(ck.dir)
    assert m == ck.manifest
    out = fmt.load_stored_tensors(ck.dir, m)
    assert list(out) == list(ck.manifest["tensors"])
    raw = out[I]
    assert isinstance(raw, torch.Tensor) and raw.dtype == torch.int64 and torch.equal(raw, entries[I].tensor)
    for n in (W, B):
        e = entries[n]
        theta = out[n]
        assert isinstance(theta, np.ndarray) and theta.dtype == np.uint16
        np.testing.assert_array_equal(theta, e.theta)
        # the loaded indices plus the manifest meta decode to what the codec decoded
        meta = m["tensors"][n]
        again = CompressedTensor(n, tuple(meta["shape"]), meta["dtype"], meta["layout"], meta["pad"],
                                 *meta["centroid"], meta["radius"], meta["box_size"], meta["U"], meta["K"],
                                 meta["bits"], meta["mae"], meta["abs_error_sum"], theta)
        assert torch.equal(again.decode(), e.decode())
    # a subset and an unverified load give the same arrays
    sub = fmt.load_stored_tensors(ck.dir, m, names=[B])
    assert list(sub) == [B]
    np.testing.assert_array_equal(sub[B], out[B])
    fast = fmt.load_stored_tensors(ck.dir, m, verify=False)
    assert torch.equal(fast[I], raw)


def test_write_shard_is_atomic_and_hashes_the_file(tmp_path):
    t = {"a": torch.arange(5, dtype=torch.int32), "b": torch.ones(3, dtype=torch.bfloat16)}
    rec = fmt.write_shard(tmp_path, "s-1.safetensors", t)
    data = (tmp_path / "s-1.safetensors").read_bytes()
    import hashlib

    assert rec == {"file": "s-1.safetensors", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    header, body = split_shard(tmp_path / "s-1.safetensors")
    assert header["__metadata__"] == {"format": fmt.FORMAT_NAME}
    assert sorted(os.listdir(tmp_path)) == ["s-1.safetensors"]  # no temporary left behind
    # the per-tensor hash is over exactly the bytes the shard holds
    ab, ae = header["b"]["data_offsets"]
    assert fmt.tensor_sha256(t["b"]) == hashlib.sha256(body[ab:ae]).hexdigest()
    with pytest.raises(ConfigError):
        fmt.write_shard(tmp_path, "../escape.safetensors", t)


def test_write_manifest_is_canonical_and_validated(ck):
    ck.write()
    p = ck.path(fmt.MANIFEST_NAME)
    fmt.write_manifest(ck.dir, ck.manifest)
    first = open(p, "rb").read()
    reordered = dict(reversed(list(ck.manifest.items())))
    fmt.write_manifest(ck.dir, reordered)
    assert open(p, "rb").read() == first
    assert first == (json.dumps(ck.manifest, sort_keys=True, indent=1) + "\n").encode()
    assert not [f for f in os.listdir(ck.dir) if f.endswith(".tmp")]
    # a manifest the loader would refuse is never committed
    os.unlink(p)
    ck.manifest["tensors"][W]["bits"] = 31
    expect(ManifestError, lambda: fmt.write_manifest(ck.dir, ck.manifest), tensor=W)
    assert not os.path.exists(p)


def test_plan_shards():
    sizes = {"a": 4, "b": 4, "c": 1, "d": 8, "e": 0}
    plan = fmt.plan_shards(sizes, 8, prefix="part")
    assert plan == {"part-00000.safetensors": ["a", "b"], "part-00001.safetensors": ["c"],
                    "part-00002.safetensors": ["d", "e"]}
    assert fmt.plan_shards(sizes, 8, prefix="part") == plan
    assert fmt.plan_shards({}, 8) == {}
    with pytest.raises(ConfigError, match="'d'"):
        fmt.plan_shards(sizes, 7)


def test_copy_extra_file_and_its_check(ck):
    ck.write()
    assert open(ck.path("config.json"), "rb").read() == CONFIG_JSON
    with open(ck.path("config.json"), "r+b") as f:
        f.write(b"[")
    expect(ChecksumError, ck.load, file="config.json")
    os.unlink(ck.path("config.json"))
    expect(MissingFileError, ck.load, file="config.json")


# -- malformed manifests ----------------------------------------------------------------

def _set(path, value):
    def edit(m):
        obj = m
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return edit


MANIFEST_CASES = [
    # id, edit, error, tensor named
    ("unknown-format-name", _set(["format"], "safetensors"), UnknownFormatError, None),
    ("unknown-format-version", _set(["format_version"], 2), UnknownFormatError, None),
    ("unknown-codec-version", _set(["codec_version"], CODEC_VERSION + 1), UnknownFormatError, None),
    ("shard-name-escapes", lambda m: (m["shards"].__setitem__("../" + S1, m["shards"].pop(S1)),
                                      m["tensors"][B].__setitem__("shard", "../" + S1),
                                      m["tensors"][I].__setitem__("shard", "../" + S1)), ManifestError, None),
    ("entry-shard-not-listed", _set(["tensors", I, "shard"], "shard-00009.safetensors"), ManifestError, I),
    ("bits-inconsistent-with-U-K", _set(["tensors", W, "bits"], 20), ManifestError, W),
    ("nonfinite-centroid", _set(["tensors", W, "centroid"], [float("nan"), 0.0]), ManifestError, W),
    ("negative-shape-dim", _set(["tensors", I, "shape"], [3, -4]), ManifestError, I),
    ("n-points-inconsistent", _set(["tensors", B, "n_points"], 22), ManifestError, B),
    ("pad-inconsistent", _set(["tensors", W, "pad"], False), ManifestError, W),
    ("unknown-dtype", _set(["tensors", I, "dtype"], "complex64"), ManifestError, I),
    ("unknown-entry-key", _set(["tensors", W, "scale"], 2.0), ManifestError, W),
    ("bad-layout", _set(["tensors", W, "layout"], "cols"), ManifestError, W),
    ("compressed-int-dtype", _set(["tensors", W, "dtype"], "int32"), ManifestError, W),
    ("bad-sha", _set(["tensors", I, "sha256"], "00"), ManifestError, I),
    ("K-over-cap", _set(["tensors", W, "K"], 65), SizeLimitError, W),
    ("ndim-over-cap", _set(["tensors", I, "shape"], [1] * 9), SizeLimitError, I),
    ("bad-config", _set(["config", "box_size"], -1.0), ManifestError, None),
    # cases of issue 9: nonsense the loader used to accept, or met with a traceback
    ("unknown-top-level-field", _set(["signature"], "x"), ManifestError, None),
    ("mae-nan", _set(["tensors", W, "mae"], float("nan")), ManifestError, W),
    ("mae-negative", _set(["tensors", W, "mae"], -5), ManifestError, W),
    ("mae-400-digit-int", _set(["tensors", W, "mae"], 10**400), ManifestError, W),
    ("abs-error-sum-inf", _set(["tensors", B, "abs_error_sum"], float("inf")), ManifestError, B),
    ("radius-400-digit-int", _set(["tensors", W, "radius"], 10**400), ManifestError, W),
    ("centroid-400-digit-int", _set(["tensors", W, "centroid"], [10**400, 0.0]), ManifestError, W),
    ("box-size-string", _set(["tensors", W, "box_size"], "0.1"), ManifestError, W),
    # U and K each within their caps, their product (the decode table) not
    ("decode-table-U24-K3", lambda m: m["tensors"][W].update(U=2**24, K=3, bits=26), SizeLimitError, W),
    ("decode-table-U22-K64", lambda m: m["tensors"][W].update(U=2**22, K=64, bits=29), SizeLimitError, W),
    ("overrides-unknown-key", _set(["config", "overrides"], [{"pattern": "a", "colour": 1}]), ManifestError, None),
    ("overrides-no-pattern", _set(["config", "overrides"], [{"raw": True}]), ManifestError, None),
    ("overrides-not-a-list", _set(["config", "overrides"], {"pattern": "a"}), ManifestError, None),
    ("config-points-string", _set(["config", "points"], ["abc"]), ManifestError, None),
    ("config-points-float", _set(["config", "points"], [1600.9]), ManifestError, None),
    ("config-points-inf", _set(["config", "points"], [1e999]), ManifestError, None),
    ("config-mae-400-digits", _set(["config", "target_mae"], 10**400), ManifestError, None),
    ("config-fallback-below-target", _set(["config", "fallback_mae"], 0.0001), ManifestError, None),
]


@pytest.mark.parametrize("edit,exc,tensor", [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES])
def test_malformed_manifest(ck, edit, exc, tensor):
    ck.write()
    edit(ck.manifest)
    ck.write_manifest_text()
    expect(exc, lambda: fmt.read_manifest(ck.dir), file=fmt.MANIFEST_NAME, tensor=tensor)
    # the loader re-validates a manifest dict it is handed, too
    expect(exc, lambda: fmt.load_stored_tensors(ck.dir, ck.manifest), file=fmt.MANIFEST_NAME, tensor=tensor)


def test_missing_manifest(ck):
    ck.write()
    os.unlink(ck.path(fmt.MANIFEST_NAME))
    expect(ManifestError, ck.load, file=fmt.MANIFEST_NAME, match="not a committed checkpoint")


def test_manifest_not_json(ck):
    ck.write()
    text = json.dumps(ck.manifest)
    ck.write_manifest_text(text[: len(text) // 2])
    expect(ManifestError, ck.load, file=fmt.MANIFEST_NAME, match="not valid JSON")


def test_manifest_deeply_nested_does_not_crash(ck):
    ck.write()
    ck.write_manifest_text("[" * 200_000 + "]" * 200_000)
    expect(ManifestError, ck.load, file=fmt.MANIFEST_NAME)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_manifest_fifo_does_not_hang(ck):
    ck.write()
    os.unlink(ck.path(fmt.MANIFEST_NAME))
    os.mkfifo(ck.path(fmt.MANIFEST_NAME))
    result = []
    t = threading.Thread(target=lambda: result.append(pytest.raises(ManifestError, ck.load)), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and result


def test_manifest_over_size_cap(ck):
    ck.write()
    expect(SizeLimitError, lambda: ck.load(limits=fmt.LoadLimits(max_manifest_bytes=256)), file=fmt.MANIFEST_NAME)


def test_duplicate_tensor_key_in_manifest(ck):
    ck.write()
    text = json.dumps(ck.manifest, indent=1)
    entry = json.dumps(ck.manifest["tensors"][I])
    text = text.replace('"tensors": {', '"tensors": {' + json.dumps(I) + ": " + entry + ",", 1)
    ck.write_manifest_text(text)
    expect(DuplicateTensorError, ck.load, file=fmt.MANIFEST_NAME, tensor=I)


def test_duplicate_key_elsewhere_in_manifest(ck):
    ck.write()
    text = json.dumps(ck.manifest, indent=1)
    ck.write_manifest_text(text.replace("{", '{"format": "x", ', 1))
    expect(ManifestError, ck.load, file=fmt.MANIFEST_NAME, match="'format'")


def test_declared_shape_over_tensor_cap_allocates_nothing(ck):
    ck.write()
    ck.manifest["tensors"][I]["shape"] = [2**20, 2**20, 2**12]  # 32 PiB of int64
    ck.write_manifest_text()
    tracemalloc.start()
    try:
        expect(SizeLimitError, lambda: fmt.read_manifest(ck.dir), file=fmt.MANIFEST_NAME, tensor=I)
        expect(SizeLimitError, lambda: fmt.load_stored_tensors(ck.dir, ck.manifest), tensor=I)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    # the total cap as well: each tensor fits, all together do not
    limits = fmt.LoadLimits(max_total_bytes=500)
    ck.manifest["tensors"][I]["shape"] = [3, 4]
    ck.write_manifest_text()
    expect(SizeLimitError, lambda: ck.load(limits=limits), file=fmt.MANIFEST_NAME)


# -- malformed shards ----------------------------------------------------------------------

def test_missing_shard_file(ck):
    ck.write()
    os.unlink(ck.path(S1))
    err = expect(MissingFileError, ck.load, file=S1, tensor=B)
    assert isinstance(err, MissingTensorError)


def test_missing_tensor_in_shard(ck):
    ck.write()
    ck.plan[S1] = [B]
    ck.write()
    expect(MissingTensorError, ck.load, file=S1, tensor=I)


def test_extra_tensor_in_shard(ck):
    ck.stored["stray.bias"] = torch.zeros(4)
    ck.plan[S1] = [B, I, "stray.bias"]
    ck.write()
    expect(UnexpectedTensorError, ck.load, file=S1, tensor="stray.bias")


def test_tensor_in_the_wrong_shard(ck):
    ck.plan = {S0: [W, I], S1: [B]}
    ck.write()
    expect(UnexpectedTensorError, ck.load, file=S0, tensor=I)


def test_wrong_stored_dtype(ck):
    ck.stored[I] = ck.stored[I].to(torch.int32)
    ck.write()
    expect(DTypeMismatchError, ck.load, file=S1, tensor=I)


def test_wrong_raw_shape(ck):
    ck.stored[I] = ck.stored[I].reshape(4, 3)
    ck.write()
    expect(DTypeMismatchError, ck.load, file=S1, tensor=I)


def test_packed_indices_with_wrong_dtype(ck):
    ck.stored[B] = ck.stored[B].to(torch.int16)
    ck.write()
    expect(DTypeMismatchError, ck.load, file=S1, tensor=B)


@pytest.mark.parametrize("delta", [1, -1])
def test_packed_length_off_by_one(ck, delta):
    p = ck.stored[W]
    ck.stored[W] = torch.cat([p, torch.zeros(1, dtype=torch.uint8)]) if delta > 0 else p[:-1].clone()
    ck.write()
    expect(PackedLengthError, ck.load, file=S0, tensor=W)


def test_index_out_of_range(ck, entries):
    e = entries[W]
    n_codes = e.U * (e.K + 1)
    bits = (n_codes - 1).bit_length()
    assert 2**bits - 1 >= n_codes  # a value that fits the field but not the codebook exists
    theta = e.theta.astype(np.uint32)
    theta[7] = n_codes
    packed = torch.from_numpy(qp.pack_bits(theta, bits))
    ck.stored[W] = packed
    m = ck.manifest["tensors"][W]
    m["bits"] = bits
    m["sha256"] = fmt.tensor_sha256(packed)  # consistent checksums: only the range check can object
    ck.write()
    err = expect(IndexRangeError, ck.load, file=S0, tensor=W)
    assert "point 7" in str(err)
    # the range check runs even when checksums are skipped
    expect(IndexRangeError, lambda: ck.load(verify=False), file=S0, tensor=W)


def test_tensor_checksum_mismatch(ck):
    t = ck.stored[I].clone()
    t.reshape(-1).view(torch.uint8)[5] ^= 0x01
    ck.stored[I] = t
    ck.write()
    expect(ChecksumError, ck.load, file=S1, tensor=I)
    ck.load(verify=False)  # the bytes themselves are well formed


def test_shard_file_checksum_mismatch(ck):
    ck.write()
    header, body = split_shard(ck.path(S1))
    b, _ = header[I]["data_offsets"]
    data = bytearray(open(ck.path(S1), "rb").read())
    data[len(data) - len(body) + b] ^= 0x01
    open(ck.path(S1), "wb").write(bytes(data))
    # the tensor's own checksum now agrees: only the whole-file checksum notices
    t = ck.stored[I].clone()
    t.reshape(-1).view(torch.uint8)[0] ^= 0x01
    ck.manifest["tensors"][I]["sha256"] = fmt.tensor_sha256(t)
    ck.write_manifest_text()
    expect(ChecksumError, ck.load, file=S1, match="shard file")


def test_shard_size_differs_from_manifest(ck):
    ck.write()
    with open(ck.path(S1), "ab") as f:
        f.write(b"\0")
    expect(TruncatedDataError, ck.load, file=S1)


def test_truncated_shard(ck):
    ck.write()
    data = open(ck.path(S1), "rb").read()
    with open(ck.path(S1), "wb") as f:
        f.write(data[:-5])
    ck.refresh_shard(S1)
    expect(TruncatedDataError, ck.load, file=S1)


def test_trailing_bytes_after_shard_data(ck):
    ck.write()
    with open(ck.path(S1), "ab") as f:
        f.write(b"\0" * 8)
    ck.refresh_shard(S1)
    expect(TruncatedDataError, ck.load, file=S1, match="trailing")


def test_header_length_past_eof(ck):
    ck.write()
    data = bytearray(open(ck.path(S1), "rb").read())
    data[:8] = struct.pack("<Q", len(data) + 10)
    open(ck.path(S1), "wb").write(bytes(data))
    ck.refresh_shard(S1)
    expect(TruncatedDataError, ck.load, file=S1, match="past the end")


def test_header_over_cap(ck):
    ck.write()
    data = bytearray(open(ck.path(S1), "rb").read())
    data[:8] = struct.pack("<Q", 2**62)
    open(ck.path(S1), "wb").write(bytes(data))
    ck.refresh_shard(S1)
    expect(SizeLimitError, ck.load, file=S1)
    ck.write()
    expect(SizeLimitError, lambda: ck.load(limits=fmt.LoadLimits(max_header_bytes=64)), file=S0)


def test_duplicate_key_in_shard_header(ck):
    ck.write()
    header, body = split_shard(ck.path(S1))
    text = json.dumps(header)
    text = text[:-1] + ", " + json.dumps(I) + ": " + json.dumps(header[I]) + "}"
    join_shard(ck.path(S1), text, body)
    ck.refresh_shard(S1)
    expect(DuplicateTensorError, ck.load, file=S1, tensor=I)


def test_shard_header_not_json(ck):
    ck.write()
    _, body = split_shard(ck.path(S1))
    join_shard(ck.path(S1), '{"a": ', body)
    ck.refresh_shard(S1)
    expect(ShardHeaderError, ck.load, file=S1)


def test_shard_header_offsets_overlap(ck):
    ck.write()
    header, body = split_shard(ck.path(S1))
    b, e = header[B]["data_offsets"]
    header[B]["data_offsets"] = [b + 1, e + 1] if b == 0 else [b - 1, e - 1]
    join_shard(ck.path(S1), json.dumps(header), body)
    ck.refresh_shard(S1)
    expect(ShardHeaderError, ck.load, file=S1)


def test_shard_header_shape_disagrees_with_offsets(ck):
    ck.write()
    header, body = split_shard(ck.path(S1))
    header[I]["shape"] = [2**40]
    join_shard(ck.path(S1), json.dumps(header), body)
    ck.refresh_shard(S1)
    expect(ShardHeaderError, ck.load, file=S1, tensor=I)


def test_every_single_byte_corruption_is_refused(ck):
    """Flip each byte of a shard in turn: every variant raises a FormatError, none
    crashes with another exception."""
    ck.write()
    good = open(ck.path(S1), "rb").read()
    m = fmt.read_manifest(ck.dir)
    for pos in range(len(good)):
        bad = bytearray(good)
        bad[pos] ^= 0x5A
        with open(ck.path(S1), "wb") as f:
            f.write(bytes(bad))
        with pytest.raises(FormatError):
            fmt.load_stored_tensors(ck.dir, m, names=[B, I])
    for cut in range(0, len(good), 7):
        with open(ck.path(S1), "wb") as f:
            f.write(good[:cut])
        with pytest.raises(FormatError):
            fmt.load_stored_tensors(ck.dir, m, names=[I])


def test_unverified_corruption_never_escapes_as_another_exception(ck):
    """Without checksums only the structural checks stand between a corrupt header
    and the reader: each flip either loads or raises a FormatError."""
    ck.write()
    good = open(ck.path(S1), "rb").read()
    m = fmt.read_manifest(ck.dir)
    (hlen,) = struct.unpack("<Q", good[:8])
    refused = 0
    for pos in range(8 + hlen):
        for flip in (0x01, 0x20, 0x80):
            bad = bytearray(good)
            bad[pos] ^= flip
            with open(ck.path(S1), "wb") as f:
                f.write(bytes(bad))
            try:
                fmt.load_stored_tensors(ck.dir, m, names=[B, I], verify=False)
            except FormatError:
                refused += 1
    assert refused > (8 + hlen)  # most header damage is caught structurally


def test_every_dtype_and_wide_indices_round_trip(tmp_path):
    """Raw tensors of every dtype (scalar and empty included) and a compressed entry
    whose indices need more than 16 bits."""
    from compressor.codec import RawTensor

    g = torch.Generator().manual_seed(1)
    raws = [
        RawTensor("f64", torch.randn(3, 2, dtype=torch.float64, generator=g), "small"),
        RawTensor("f16", torch.randn(5, dtype=torch.float16, generator=g), "small"),
        RawTensor("bf16", torch.randn(2, 2, generator=g).to(torch.bfloat16), "buffer"),
        RawTensor("i8", torch.tensor([-128, 0, 127], dtype=torch.int8), "non-float"),
        RawTensor("i16", torch.tensor([[-3, 9]], dtype=torch.int16), "non-float"),
        RawTensor("i32", torch.tensor(7, dtype=torch.int32), "non-float"),  # 0-d
        RawTensor("u8", torch.zeros(0, 4, dtype=torch.uint8), "non-float"),  # empty
        RawTensor("mask", torch.tensor([True, False, True]), "non-float"),
    ]
    U, K = 40000, 3
    theta = torch.randint(0, U * (K + 1), (30,), generator=g).numpy().astype(np.uint32)
    theta[0] = U * (K + 1) - 1
    bits = qp.bits_for(int(theta.max()))
    assert bits > 16
    wide = CompressedTensor("wide", (6, 10), "float32", "rows", False, 0.0, 0.0, 0.3, 0.1, U, K, bits,
                            0.0, 0.0, theta)
    entries = {e.name: e for e in [*raws, wide]}
    stored = {n: fmt.stored_tensor(e) for n, e in entries.items()}
    rec = fmt.write_shard(tmp_path, "all.safetensors", stored)
    manifest = {
        "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION,
        "producer": {"name": "birkhoff", "version": "0.1.0"}, "codec_version": CODEC_VERSION,
        "config": CFG.to_dict(), "source": {}, "extra_files": {},
        "shards": {"all.safetensors": {"bytes": rec["bytes"], "sha256": rec["sha256"]}},
        "tensors": {n: fmt.manifest_entry(e, "all.safetensors", stored[n]) for n, e in entries.items()},
    }
    fmt.write_manifest(tmp_path, manifest)
    out = fmt.load_stored_tensors(tmp_path, fmt.read_manifest(tmp_path))
    for r in raws:
        assert out[r.name].dtype == r.tensor.dtype and torch.equal(out[r.name], r.tensor), r.name
    assert out["wide"].dtype == np.uint32
    np.testing.assert_array_equal(out["wide"], theta)


# -- costs bounded by what the files hold, not by what their fields claim (issue 9) ----------

def test_decode_table_product_refused_before_allocating(ck):
    """A tiny checkpoint declaring U = 2**24 and K = 3 (each within its cap): the
    decode table would be 2**26 float64 entries, twice. Refused with nothing allocated."""
    ck.write()
    ck.manifest["tensors"][W].update(U=2**24, K=3, bits=26)
    ck.write_manifest_text()
    from compressor.checkpoint import CompressedCheckpoint

    tracemalloc.start()
    try:
        expect(SizeLimitError, lambda: CompressedCheckpoint.load(ck.dir), file=fmt.MANIFEST_NAME, tensor=W,
               match="U*(K+1)")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_manifest_full_of_empty_lists_is_refused_unparsed(ck):
    """60 MB of ``[],`` (under the 64 MiB size cap) would parse into ~20M lists
    (about 1.9 GB). The value count is bounded before parsing."""
    ck.write()
    m = dict(ck.manifest, source={"junk": None})
    text = json.dumps(m, sort_keys=True)
    junk = "[" + "[]," * (20 * 2**20) + "[]]"
    ck.write_manifest_text(text.replace('"junk": null', '"junk": ' + junk))
    assert os.path.getsize(ck.path(fmt.MANIFEST_NAME)) > 60 * 10**6
    tracemalloc.start()
    try:
        expect(SizeLimitError, lambda: fmt.read_manifest(ck.dir), file=fmt.MANIFEST_NAME, match="values")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 << 20, peak  # the file's bytes (read once), nothing parsed from them
    # the same for nested dicts, under a lower cap
    ck.write_manifest_text(text.replace('"junk": null', '"junk": [' + ",".join(["{}"] * 5000) + "]"))
    expect(SizeLimitError, lambda: fmt.read_manifest(ck.dir, fmt.LoadLimits(max_manifest_nodes=1000)),
           file=fmt.MANIFEST_NAME)
    # a normal manifest is far below the default cap
    ck.write_manifest_text()
    assert fmt.json_nodes(open(ck.path(fmt.MANIFEST_NAME), "rb").read()) < 200


def test_shard_header_larger_than_its_tensors_need_is_refused_unparsed(ck):
    """A shard header padded to megabytes (metadata, junk) is refused by the size
    its manifest-declared tensors can need, before it is parsed."""
    ck.write()
    header, body = split_shard(ck.path(S1))
    header["__metadata__"] = {"format": fmt.FORMAT_NAME, "pad": "x" * (2 << 20)}
    join_shard(ck.path(S1), json.dumps(header), body)
    ck.refresh_shard(S1)
    expect(SizeLimitError, ck.load, file=S1, match="need at most")


def test_error_messages_do_not_echo_huge_values(ck):
    ck.write()
    ck.manifest["tensors"][W]["layout"] = "r" * (1 << 20)
    ck.write_manifest_text()
    err = expect(ManifestError, lambda: fmt.read_manifest(ck.dir), tensor=W)
    assert len(str(err)) < 2000
