"""Checkpoint URIs in the compressor (``compressor.uris``): local paths pass through,
other schemes go to the resolvers registered as ``birkhoff.uri_resolvers`` entry
points, and a scheme nobody registered is a typed error that says what to install.
(The real s3:// and models:/ resolvers run against SeaweedFS and an MLflow server in
tests/workflows/test_checkpoint_uris.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from compressor.errors import CheckpointURIError
from compressor.uris import ENTRY_POINT_GROUP, is_uri, resolve_checkpoint, uri_scheme

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, scheme", [
    ("s3://bucket/a/b/", "s3"), ("S3://bucket/a", "s3"), ("models:/birkhoff-sam@latest", "models"),
    ("models:/birkhoff-sam/3", "models"), ("gs://b/x", "gs"), ("file:///tmp/x", "file"),
    ("s3:/bucket/a", "s3"),  # what Path("s3://bucket/a") makes of a URI: refused, never a folder
    ("relative/dir", None), ("/abs/dir", None), ("C:/windows/dir", None), ("dir:with/colon", None),
    ("./models:/x", None),
])
def test_scheme_of(text, scheme):
    assert uri_scheme(text) == scheme
    assert is_uri(text) == (scheme is not None)


def test_local_paths_and_file_uris_resolve_to_themselves(tmp_path):
    assert resolve_checkpoint(tmp_path) == tmp_path
    assert resolve_checkpoint(str(tmp_path / "x")) == tmp_path / "x"
    assert resolve_checkpoint(f"file://{tmp_path}/a%20b") == tmp_path / "a b"


def test_unknown_scheme_names_it_and_what_to_install():
    with pytest.raises(CheckpointURIError) as e:
        resolve_checkpoint("gs://user:secret@bucket/ckpt/")
    msg = str(e.value)
    assert "gs:" in msg and ENTRY_POINT_GROUP in msg and "install" in msg
    assert "secret" not in msg and e.value.file == "gs://bucket/ckpt/"


def test_mangled_s3_uri_is_refused_as_such():
    with pytest.raises(CheckpointURIError, match=r"malformed s3: URI \(expected s3://"):
        resolve_checkpoint("s3:/bucket/ckpt")


def test_this_package_registers_s3_and_models():
    eps = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert eps.get("s3") == "workflows.checkpoint_cache:fetch_s3"
    assert eps.get("models") == "workflows.registry:fetch_registry"


@pytest.mark.parametrize("command", ["inspect", "decompress"])
def test_cli_refuses_an_unknown_scheme_in_one_line(command, tmp_path):
    args = [sys.executable, "-m", "birkhoff", command, "gs://bucket/ckpt/"]
    if command == "decompress":
        args.append(str(tmp_path / "out.safetensors"))
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"birkhoff {command}: error: CheckpointURIError: no resolver "
                                                        "for gs: URIs"), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out.safetensors").exists()
