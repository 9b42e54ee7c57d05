"""Checkpoints named by URI: ``s3://bucket/prefix/``, ``models:/<name>@<alias>``.

The loaders (:func:`compressor.load_model`, ``CompressedCheckpoint.load``) and the
``birkhoff`` subcommands take a local directory or a URI. The compressor imports
neither boto3 nor MLflow nor the workflow (the layer contract), so it does not
download anything itself: a URI's scheme is looked up among the Python entry
points of group ``birkhoff.uri_resolvers``, the way fsspec finds its backends.
This package's ``pyproject.toml`` registers ``s3`` and ``models`` (the workflow's
store cache and MLflow registry); another package can register more. A resolver
is a callable ``resolver(uri) -> local directory``: it downloads into a verified
cache and returns the cached copy.

``file://`` URIs are local paths and need no resolver.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

from .errors import CheckpointURIError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "birkhoff.uri_resolvers"
# RFC 3986 scheme followed by "://"; MLflow's registry URIs are "models:/name@alias"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(//|/(?!/))")
_HINTS = {
    "s3": "install birkhoff with its workflow dependencies (boto3): pip install birkhoff",
    "models": "install birkhoff with its workflow dependencies (mlflow): pip install birkhoff",
}


def uri_scheme(text) -> str | None:
    """``"s3"`` for ``s3://...``, ``"models"`` for ``models:/...``, None for a local path.
    A one-letter scheme is a Windows drive (``C:/x``), not a URI."""
    if isinstance(text, os.PathLike) or not isinstance(text, str):
        return None
    m = _SCHEME.match(text)
    if m is None or len(m.group(1)) == 1:
        return None
    # "s3:/bucket" (one slash: what Path() makes of s3://bucket) counts as a URI too,
    # so that it is refused as malformed instead of looked for as a relative folder
    return m.group(1).lower()


def is_uri(text) -> bool:
    return uri_scheme(text) is not None


def shown(uri: str) -> str:
    """The URI as messages show it: without user info (a credential) or query."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" if parts.netloc else f"{parts.scheme}:{parts.path}"


def _resolver(scheme: str, uri: str) -> Callable[[str], object]:
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name.lower() == scheme]
    if not found:
        hint = _HINTS.get(scheme, f"install a package that registers a {ENTRY_POINT_GROUP!r} entry point "
                                  f"named {scheme!r}")
        raise CheckpointURIError(f"no resolver for {scheme}: URIs is installed ({hint}); or pass a local "
                                 f"checkpoint directory", file=shown(uri))
    if len(found) > 1:
        log.warning("%d resolvers registered for %s: URIs (%s); using %s", len(found), scheme,
                    ", ".join(ep.value for ep in found), found[0].value)
    try:
        return found[0].load()
    except ImportError as exc:
        raise CheckpointURIError(f"the {scheme}: resolver {found[0].value} cannot be loaded ({exc}); "
                                 f"{_HINTS.get(scheme, 'install its dependencies')}", file=shown(uri)) from exc


def resolve_checkpoint(path_or_uri) -> Path:
    """A local directory holding the checkpoint ``path_or_uri`` names.

    A local path (``str`` or ``os.PathLike``) is returned as it is (no check: the
    loader names what is missing); ``file://`` becomes its path; any other scheme
    goes to its registered resolver, which downloads into its verified cache.
    Unknown schemes raise :class:`~compressor.errors.CheckpointURIError` (the scheme
    and what to install)."""
    scheme = uri_scheme(path_or_uri)
    if scheme is None:
        return Path(path_or_uri)
    uri = str(path_or_uri)
    if scheme == "file":
        return Path(unquote(urlsplit(uri).path))
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", uri) and scheme != "models":
        raise CheckpointURIError(f"malformed {scheme}: URI (expected {scheme}://...)", file=shown(uri))
    local = _resolver(scheme, uri)(uri)
    log.debug("%s resolved to %s", shown(uri), local)
    return Path(local)
