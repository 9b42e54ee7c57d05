"""Which codec a config selects, and the codec-tagged dict form of a config that
crosses process boundaries (a Ray job, a zoo file).

The paper's codec (``HyperCompressionConfig``, codec version 1, format version 1)
and codec v2 (``CodecV2Config``, codec version 2, format version 2). A dict
without a ``codec`` key is the paper's, as every dict written before codec v2.
"""

from __future__ import annotations

from typing import Any, Mapping, Union

from .codec_v2.config import CodecV2Config
from .config import HyperCompressionConfig
from .errors import ConfigError

CodecConfig = Union[HyperCompressionConfig, CodecV2Config]
CODECS = ("paper", "v2")


def codec_of(config: CodecConfig) -> str:
    return "v2" if isinstance(config, CodecV2Config) else "paper"


def codec_version_of(config: CodecConfig) -> int:
    return 2 if isinstance(config, CodecV2Config) else 1


def format_version_of(config: CodecConfig) -> int:
    """The checkpoint format a codec writes (compressor.format: 1 the paper's, 2 v2's)."""
    return 2 if isinstance(config, CodecV2Config) else 1


def codec_params(config: CodecConfig) -> dict[str, Any]:
    """What a run records of its codec: name, codec version, format version."""
    return {"codec": codec_of(config), "codec_version": codec_version_of(config),
            "format_version": format_version_of(config)}


def codec_tag(config: CodecConfig) -> str:
    """The stable ``codec`` tag of a model's MLflow run."""
    return f"hypercompression-v{codec_version_of(config)}"


def config_to_dict(config: CodecConfig) -> dict[str, Any]:
    """``config.to_dict()`` plus ``codec``."""
    return {"codec": codec_of(config), **config.to_dict()}


def config_from_dict(d: Mapping[str, Any]) -> CodecConfig:
    """The config a (zoo or job) dict names: ``codec: paper`` (the default) or ``v2``,
    then that codec's fields. ``ConfigError`` for anything else."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"a codec config must be a mapping, got {type(d).__name__}")
    fields = dict(d)
    codec = fields.pop("codec", "paper")
    if codec == "paper":
        return HyperCompressionConfig.from_dict(fields)
    if codec == "v2":
        return CodecV2Config.from_dict(fields)
    raise ConfigError(f"unknown codec {codec!r}; choose one of {list(CODECS)}")
