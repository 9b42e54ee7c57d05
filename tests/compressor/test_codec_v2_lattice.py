"""Codec v2: the NumPy reference lattice (compressor/codec_v2/lattice.py) and its config."""

from __future__ import annotations

import math

import numpy as np
import pytest

from compressor.codec_v2 import CodecV2Config, PRESETS
from compressor.codec_v2 import lattice as L
from compressor.codec_v2.config import REL_ERROR_PER_STEP
from compressor.errors import ConfigError

COVERING_RADIUS = 1 / math.sqrt(3)  # A2 with nearest-neighbour distance 1


def _brute_nearest_dist(ux, uy):
    """Distance to the nearest A2 point by enumerating a window of lattice points."""
    best = np.full(ux.shape, np.inf)
    b0 = np.floor(uy / L.H).astype(np.int64)
    m0 = np.floor(ux).astype(np.int64)
    for db in range(-2, 4):
        for dm in range(-2, 4):
            b = b0 + db
            m = m0 + dm
            px, py = L.a2_point(m, b)
            best = np.minimum(best, np.hypot(ux - px, uy - py))
    return best


def test_a2_nearest_is_the_nearest_point():
    rng = np.random.default_rng(0)
    ux = rng.uniform(-50, 50, 20000)
    uy = rng.uniform(-50, 50, 20000)
    m, b = L.a2_nearest(ux, uy)
    px, py = L.a2_point(m, b)
    d = np.hypot(ux - px, uy - py)
    np.testing.assert_allclose(d, _brute_nearest_dist(ux, uy), rtol=0, atol=1e-12)
    assert d.max() <= COVERING_RADIUS + 1e-12


def test_a2_exact_points_and_ties_are_deterministic():
    m = np.arange(-5, 6)
    b = np.arange(-5, 6)[::-1]
    px, py = L.a2_point(m, b)
    mm, bb = L.a2_nearest(px, py)
    assert np.array_equal(mm, m) and np.array_equal(bb, b)
    # a point half-way between two coset-0 neighbours: the same answer every call
    r1 = L.a2_nearest(np.array([0.5]), np.array([0.0]))
    r2 = L.a2_nearest(np.array([0.5]), np.array([0.0]))
    assert r1 == r2


def test_encode_decode_error_bounded_by_covering_radius_even_for_outliers():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 37)) * 0.05
    w[3, 5] = 400.0  # 8000 row RMS away: an unbounded lattice gives it its own point
    w[7, 36] = -123.0  # the odd last column
    ss = L.row_sumsq(w)
    base, rel = L.row_steps(ss, w.shape[1], 0.2)
    steps = L.steps_f64(base, rel)
    m, b = L.encode_rows(w, steps)
    dec = L.decode_rows(m, b, steps, w.shape[1])
    err = np.abs(dec - w)
    assert (err <= steps[:, None] * COVERING_RADIUS + 1e-12).all()
    assert abs(dec[3, 5] - 400.0) <= steps[3] * COVERING_RADIUS
    assert m.shape == (16, 19) and b[:, -1].max() == 0 and b[:, -1].min() == 0  # padding y = 0 -> b = 0


def test_row_steps_are_exact_in_float32_and_scale_with_rows():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 100)) * np.geomspace(1e-3, 10, 64)[:, None]
    ss = L.row_sumsq(w)
    base, rel = L.row_steps(ss, 100, 0.15)
    assert L.base_is_valid(base)
    steps = L.steps_f64(base, rel)
    assert np.array_equal(steps.astype(np.float32).astype(np.float64), steps)
    rms = np.sqrt((w ** 2).mean(axis=1))
    np.testing.assert_allclose(steps / rms, 0.15, rtol=2e-3)  # q times the row RMS (float16 rounding)
    # a row 10**6.5 times below the tensor's RMS still gets a step of its own scale (float16 subnormal)
    w[0] *= 1e-3
    base, rel = L.row_steps(L.row_sumsq(w), 100, 0.15)
    assert L.steps_f64(base, rel)[0] / np.sqrt((w[0] ** 2).mean()) == pytest.approx(0.15, rel=0.2)


def test_row_sumsq_is_column_ordered():
    w = np.array([[1e16, 1.0, -1e16, 1.0]])
    acc = 0.0
    for v in w[0]:
        acc += v * v
    assert L.row_sumsq(w)[0] == acc


def test_zero_rows_and_zero_tensors():
    w = np.zeros((4, 8))
    w[1] = 0.3
    base, rel = L.row_steps(L.row_sumsq(w), 8, 0.1)
    assert (rel.astype(np.float64) >= L.FP16_MIN).all()
    m, b = L.encode_rows(w, L.steps_f64(base, rel))
    assert not m[0].any() and not b[0].any()
    base0, rel0 = L.row_steps(L.row_sumsq(np.zeros((3, 5))), 5, 0.1)
    assert base0 > 0 and np.isfinite(rel0.astype(np.float64)).all()


def test_row_steps_refuse_a_range_float32_cannot_hold():
    # tensor RMS 1e-29: q * RMS is below float32's normal range
    with pytest.raises(ValueError):
        L.row_steps(np.array([0.0, 2e-58]), 1, 1e-3)
    with pytest.raises(ValueError):
        L.round_base(float("inf"))


def test_round_base_keeps_13_bits():
    for v in (0.1, 3.3e-7, 1234.567, 2.0 ** -100):
        b = L.round_base(v)
        assert L.base_is_valid(b) and abs(b - v) <= v * 2.0 ** -13
    assert not L.base_is_valid(0.1)  # 0.1 has 53 significant bits
    assert not L.base_is_valid(float("nan")) and not L.base_is_valid(-1.0) and not L.base_is_valid(0.0)


def test_paper_and_square_lattices_for_the_design_measurement():
    rng = np.random.default_rng(3)
    ux, uy = rng.uniform(-9, 9, 5000), rng.uniform(-9, 9, 5000)
    m, b, px, py = L.z2_nearest(ux, uy)
    assert np.abs(ux - px).max() <= 0.5 and np.abs(uy - py).max() <= 0.5
    a, bb, sx, sy = L.sheared_nearest(ux, uy, k=40)
    d = np.hypot(ux - sx, uy - sy)
    # brute force over the rows and columns around the point
    best = np.full(ux.shape, np.inf)
    for db in range(-2, 3):
        rb = np.round(uy) + db
        for da in range(-2, 3):
            ra = np.round(ux - rb / 40) + da
            best = np.minimum(best, np.hypot(ux - (ra + rb / 40), uy - rb))
    np.testing.assert_allclose(d, best, atol=1e-12)


# -- config -------------------------------------------------------------------------------

def test_config_presets_and_knobs():
    assert CodecV2Config().preset == "faithful" and CodecV2Config().rel_step == PRESETS["faithful"]
    assert CodecV2Config(preset="small").rel_step > CodecV2Config().rel_step
    assert CodecV2Config(rel_error=0.05).rel_step == pytest.approx(0.05 / REL_ERROR_PER_STEP)
    assert REL_ERROR_PER_STEP == pytest.approx(math.sqrt(5 / 72))
    cfg = CodecV2Config(bits_per_weight=4.0, embedding_factor=2.0)
    assert CodecV2Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.config_hash() == CodecV2Config.from_dict(cfg.to_dict()).config_hash()
    assert cfg.config_hash() != CodecV2Config().config_hash()
    assert CodecV2Config().is_embedding("embeddings.word_embeddings.weight")
    assert not CodecV2Config().is_embedding("encoder.layer.0.attention.self.query.weight")


@pytest.mark.parametrize("kw", [dict(version=2), dict(preset="tiny"), dict(rel_error=0.0), dict(rel_error=float("nan")),
                                dict(bits_per_weight=0.1), dict(bits_per_weight=99.0), dict(embedding_factor=0),
                                dict(block_pairs=10), dict(min_elements=1), dict(lattice="z2"),
                                dict(embedding_patterns=("",)), dict(rel_error=True)])
def test_config_rejects(kw):
    with pytest.raises(ConfigError):
        CodecV2Config(**kw)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError):
        CodecV2Config.from_dict({"preset": "small", "box_size": 0.1})
    with pytest.raises(ConfigError):
        CodecV2Config.from_dict(["preset"])
