"""``birkhoff``: compress, decompress, inspect, warmup (:mod:`compressor.cli`) and eval
(:mod:`eval_jobs.cli`, when its dependencies are installed)."""

from __future__ import annotations

import logging
import sys

from compressor import cli as codec_cli

log = logging.getLogger("birkhoff")


def resolve_source(uri: str) -> str:
    """A recorded workflow source (``package:``, ``demo:``, ``s3://``) as a local path or
    Hub id, the way the workflow resolved it (imported on use: ``compress`` stays light)."""
    from workflows.zoo import resolve_source as resolve

    return resolve(uri)


def _register_eval(sub) -> None:
    try:  # evaluation needs Ray and MLflow; optional here
        from eval_jobs.cli import register
    except ImportError as exc:
        log.debug("eval subcommand unavailable: %s", exc)
    else:
        register(sub, resolve_source=resolve_source)


def build_parser():
    return codec_cli.build_parser((_register_eval,))


def main(argv: list[str] | None = None) -> int:
    return codec_cli.main(argv, register_more=(_register_eval,))


if __name__ == "__main__":
    sys.exit(main())
