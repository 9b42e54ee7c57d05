"""Committed checkpoints as versions in MLflow's model registry.

Each zoo model has one registered model, named ``birkhoff-<zoo model>``: the
prefix keeps Birkhoff's compressed checkpoints apart from other models on a shared
server (an uncompressed ``sam-vit-base`` someone registered), and the zoo name
alone is stable night after night. Each committed checkpoint is a model version
whose ``source`` is its store URI (``s3://bucket/prefix/``): the registry points
at the store, it holds no copy. Tags record the manifest's sha256 (which commit
under that URI the version is), the source sha256 and the run.

``models:/<name>@latest`` is MLflow's own: ``latest`` is a reserved alias name
(MLflow 3.17's registry stores refuse it in ``set_registered_model_alias``) that the
server resolves to the highest version number (``get_model_version_by_alias``). So "moving ``latest``" means: the
checkpoint a run committed or found must be the highest version.
:func:`register_checkpoint` adds a version unless the highest version already is
this URI and manifest (a rerun that skipped), so ``@latest`` always names the
checkpoint of the last run, even when that run went back to an older one.

:func:`fetch_registry` (the ``models`` entry point of ``birkhoff.uri_resolvers``)
resolves ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` through
``MlflowClient`` (``MLFLOW_TRACKING_URI``) to the version's source, then fetches
that store URI into the verified cache (:mod:`workflows.checkpoint_cache`),
refusing a commit other than the one the version recorded. MLflow's own
``models:/`` download would copy artifacts; the checkpoint is in the store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Mapping

from .errors import WorkflowError
from .redaction import redact, redact_uri

log = logging.getLogger(__name__)

NAME_PREFIX = "birkhoff-"
LATEST = "latest"
TAG_MANIFEST = "birkhoff.manifest_sha256"
TAG_SOURCE_SHA = "birkhoff.source_sha256"
TAG_MODEL = "birkhoff.model"
TAG_URI = "birkhoff.checkpoint_uri"


class RegistryError(WorkflowError):
    """A checkpoint cannot be registered, or a ``models:/`` URI cannot be resolved
    (the message names the model, the version or alias, and why)."""


def registered_name(model: str) -> str:
    """The registered model of a zoo model (``birkhoff-<model>``)."""
    return model if model.startswith(NAME_PREFIX) else NAME_PREFIX + model


def _client(tracking_uri_or_client=None):
    if tracking_uri_or_client is not None and not isinstance(tracking_uri_or_client, str):
        return tracking_uri_or_client
    from mlflow.tracking import MlflowClient

    uri = tracking_uri_or_client or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RegistryError("no MLflow tracking server: set MLFLOW_TRACKING_URI (models:/ URIs live in its registry)")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _manifest_info(store_uri: str, store=None) -> tuple[str, str | None]:
    """The committed manifest's sha256 and the source sha256 it records. ``store``: the
    run's own (its endpoint) when ``store_uri`` is under it."""
    from compressor import format as fmt

    from .checkpoint_cache import split_store_uri
    from .commit import read_manifest_bytes
    from .store import open_store

    root = store.url() + "/" if store is not None else None
    if root is not None and store_uri.startswith(root) and len(store_uri) > len(root):
        prefix = store_uri[len(root):]
    else:
        base, prefix = split_store_uri(store_uri)
        store = open_store(base)
    raw = read_manifest_bytes(store, prefix)
    source = fmt.parse_manifest(raw, store_uri + fmt.MANIFEST_NAME).get("source") or {}
    return hashlib.sha256(raw).hexdigest(), source.get("sha256")


def _versions(client, name: str) -> list:
    # the name is ours (registered_name of a validated zoo name); quotes are escaped anyway
    escaped = name.replace("\\", "\\\\").replace("'", "\\'")
    return sorted(client.search_model_versions(f"name = '{escaped}'"), key=lambda v: int(v.version))


def register_checkpoint(tracking_uri_or_client, model_name: str, store_uri: str, run_id: str | None = None,
                        tags: Mapping[str, str] | None = None, *, manifest_sha256: str | None = None,
                        store=None) -> str:
    """Register the committed checkpoint at ``store_uri`` as the newest version of the
    zoo model ``model_name``'s registered model (created when missing); returns the
    version. No new version when the newest already is this URI and manifest
    (``manifest_sha256``, read from the store when not given: ``store``, the run's
    :class:`~workflows.store.Store`, else one opened from the URI): ``@latest`` resolves to
    it either way. Raises :class:`RegistryError` for a URI the server cannot resolve
    (a local folder) and MLflow's errors as they come."""
    from mlflow.exceptions import MlflowException

    if not store_uri.startswith("s3://"):
        raise RegistryError(f"{model_name}: only checkpoints in an S3 store can be registered (the registry "
                            f"points at the store, every reader must reach it); got {redact_uri(store_uri)}")
    client = _client(tracking_uri_or_client)
    name = registered_name(model_name)
    tags = {k: str(v) for k, v in (tags or {}).items()}
    sha = manifest_sha256
    if sha is None:
        sha, source_sha = _manifest_info(store_uri, store)
        if source_sha:
            tags.setdefault(TAG_SOURCE_SHA, source_sha)
    try:
        client.create_registered_model(name, tags={TAG_MODEL: model_name},
                                       description=f"Birkhoff compressed checkpoints of the zoo model {model_name}; "
                                                   f"each version's source is its store URI")
        log.info("registered model %s created", name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    versions = _versions(client, name)
    newest = versions[-1] if versions else None
    if newest is not None and newest.source == store_uri and newest.tags.get(TAG_MANIFEST) == sha:
        log.info("%s: version %s already is %s (manifest %s...)", name, newest.version, redact_uri(store_uri),
                 sha[:12])
        return str(newest.version)
    all_tags = {**tags, TAG_MANIFEST: sha, TAG_URI: store_uri, TAG_MODEL: model_name}
    mv = client.create_model_version(name, source=store_uri, run_id=run_id, tags=all_tags,
                                     description=f"{redact_uri(store_uri)} (manifest sha256 {sha})")
    log.info("%s: version %s -> %s (models:/%s@%s)", name, mv.version, redact_uri(store_uri), name, LATEST)
    return str(mv.version)


def register_outcome(tracker, run_id: str | None, out, store=None) -> str | None:
    """The zoo run's hook (``zoo_run._log_success``): register a committed or skipped
    model's checkpoint. Never raises: the checkpoint is committed, a registry failure
    is reported as a warning; a local store is not registered (nothing else can read it)."""
    uri = getattr(out, "checkpoint_uri", None)
    if tracker is None or out.status not in ("compressed", "repaired", "skipped") or not uri:
        return None
    if not uri.startswith("s3://"):
        log.debug("%s: a local store's checkpoint is not registered", out.name)
        return None
    try:
        tags = {"birkhoff.status": out.status}
        if getattr(out, "source_sha256", None):
            tags[TAG_SOURCE_SHA] = out.source_sha256
        version = register_checkpoint(tracker.client, out.name, uri, run_id, tags, store=store,
                                      manifest_sha256=getattr(out, "manifest_sha256", None))
    except Exception as exc:
        log.warning("%s: registering %s in the MLflow registry failed: %s", out.name, redact_uri(uri),
                    redact(exc))
        return None
    try:
        tracker.set_tags(run_id, {"birkhoff.registered_model": registered_name(out.name),
                                  "birkhoff.registered_version": version})
    except Exception as exc:
        log.warning("%s: tagging the run with its registry version failed: %s", out.name, redact(exc))
    return version


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))?/?$")


def resolve_models_uri(uri: str, tracking_uri_or_client=None):
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (``/latest`` too) -> the
    :class:`mlflow.entities.model_registry.ModelVersion` it names."""
    from mlflow.exceptions import MlflowException

    m = _MODELS_URI.match(uri)
    if m is None or not (m["alias"] or m["version"]):
        raise RegistryError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = m["name"], m["alias"], m["version"]
    client = _client(tracking_uri_or_client)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        if version.lower() == LATEST:
            return client.get_model_version_by_alias(name, LATEST)
        if not version.isdigit():
            raise RegistryError(f"{uri!r}: the version must be a number (stages are not used here)")
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise RegistryError(f"{uri}: {redact(exc.message if hasattr(exc, 'message') else exc)}") from None


def fetch_registry(uri: str, cache_dir=None) -> Path:
    """The ``models`` resolver of ``compressor.uris``: the registry version's store URI,
    fetched into the verified cache; a version whose URI now holds another commit
    than the one it recorded is refused (:class:`~workflows.errors.CheckpointChangedError`)."""
    from .checkpoint_cache import fetch_store_uri

    mv = resolve_models_uri(uri)
    source = mv.source or ""
    if not source.startswith("s3://"):
        raise RegistryError(f"{uri} is version {mv.version} of {mv.name}, whose source {redact_uri(source)!r} is "
                            f"not a Birkhoff store URI (s3://bucket/prefix/)")
    log.info("%s -> version %s, %s", uri, mv.version, redact_uri(source))
    return fetch_store_uri(source, cache_dir, manifest_sha256=(mv.tags or {}).get(TAG_MANIFEST))
