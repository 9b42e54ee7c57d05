import pytest

from compressor import ConfigError, HyperCompressionConfig, TensorOverride


def test_defaults_are_the_papers():
    c = HyperCompressionConfig()
    assert (c.box_size, c.points, c.max_classes, c.target_mae, c.fallback_mae) == (0.1, (1225, 1600), 3, 0.001, 0.006)
    assert c.version == 1
    assert c.settings_for("x").points_target_mae == 0.001


def test_roundtrip_and_hash_stable():
    c = HyperCompressionConfig(points=(1600, 2500), overrides=(TensorOverride("a.*", raw=True),))
    d = c.to_dict()
    assert HyperCompressionConfig.from_dict(d) == c
    assert c.config_hash() == HyperCompressionConfig.from_dict(d).config_hash()
    assert c.config_hash() != HyperCompressionConfig().config_hash()


@pytest.mark.parametrize("kw", [
    dict(box_size=0), dict(box_size=float("nan")), dict(points=()), dict(points=(1600, 1225)),
    dict(points=(2,)), dict(max_classes=0), dict(target_mae=-1), dict(version=2), dict(nonfinite="ignore"),
])
def test_invalid_configs_rejected(kw):
    with pytest.raises(ConfigError):
        HyperCompressionConfig(**kw)


def test_unknown_keys_rejected():
    with pytest.raises(ConfigError, match="unknown config keys"):
        HyperCompressionConfig.from_dict({"box": 0.1})


def test_frozen():
    with pytest.raises(Exception):
        HyperCompressionConfig().box_size = 0.2


# -- issue 9: every invalid value is a ConfigError, never a traceback or a silent fix ----------

@pytest.mark.parametrize("d,needle", [
    ({"overrides": [{"pattern": "a.*", "colour": 1}]}, "unknown override keys"),
    ({"overrides": [{"raw": True}]}, "needs a 'pattern'"),
    ({"overrides": {"pattern": "a.*"}}, "must be a list"),
    ({"overrides": "a.*"}, "must be a list"),
    ({"overrides": [["a.*"]]}, "is a mapping"),
    ({"overrides": [{"pattern": 5}]}, "non-empty string"),
    ({"overrides": [{"pattern": "a", "raw": "yes"}]}, "true or false"),
    ({"overrides": [{"pattern": "a", "points": [1600.5]}]}, "integers"),
    ({"overrides": [{"pattern": "a", "target_mae": 0.01}]}, "below the target"),
    ({"points": ["abc"]}, "integers"),
    ({"points": [1e999]}, "integers"),
    ({"points": [1600.9]}, "integers"),
    ({"points": [1600.0]}, "integers"),  # no silent float -> int either
    ({"points": [True]}, "integers"),
    ({"points": "1600"}, "list of integers"),
    ({"points": 1600}, "list of integers"),
    ({"points": list(range(100, 200))}, "above"),
    ({"target_mae": 10**400}, "finite number"),
    ({"fallback_mae": float("nan")}, "finite number"),
    ({"fallback_mae": -5}, "finite number"),
    ({"fallback_mae": "0.006"}, "finite number"),
    ({"box_size": True}, "positive finite"),
    ({"max_classes": 3.5}, "integer"),
    ({"max_classes": "3"}, "integer"),
    ({"min_elements": 10.5}, "integer"),
    ({"relative_fallback": -0.1}, "finite number"),
    ({"target_mae": 0.01}, "below the target"),  # fallback 0.006 < target 0.01
    ({"points": [2**22], "max_classes": 3}, "decode-table"),
    ({"points": [65536], "max_classes": 64}, "decode-table"),
    ({"version": "1"}, "version"),
])
def test_config_dicts_refused_with_config_errors(d, needle):
    with pytest.raises(ConfigError, match=needle):
        HyperCompressionConfig.from_dict(d)


def test_paper_settings_stay_valid():
    # the longest U list of the paper with K_max = 3, and per-tensor relative limits switched off
    c = HyperCompressionConfig(points=(1600, 2500, 3600, 6400, 8100, 10000, 22500, 40000), relative_fallback=None)
    assert HyperCompressionConfig.from_dict(c.to_dict()) == c
    assert c.settings_for("x").relative_fallback is None
    # an override may loosen the fallback together with the target
    HyperCompressionConfig(overrides=(TensorOverride("a.*", target_mae=0.01, fallback_mae=0.02),))


def test_parse_points_refuses_non_integers():
    from compressor.config import parse_points

    assert parse_points("1225, 1600") == (1225, 1600)
    for bad in ("abc", "1600.9", "1e999", "", "16,-1", "99999999999999999999"):
        with pytest.raises(ConfigError):
            parse_points(bad)
