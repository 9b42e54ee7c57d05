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
