"""Concurrent zoo runs on one store (issue 9's acceptance): two driver processes,
submitted as users submit them (``ray job submit ... python
workflows/compress_all.py`` to the session's ``ray start`` cluster), compress one model into one store at the same
time, with different plans (``--workers 1`` against ``--workers 2``) and with the
same plan, on a local folder and on SeaweedFS S3. Both end cleanly, exactly one
checkpoint is committed, it loads (every checksum verified), and nothing but
its files is left. A later run repairs a checkpoint that lost or damaged files.

CI runs BIRKHOFF_RACE_TRIALS trials per case (default 1); the full acceptance
run is ``bash scripts/race_trials.sh`` (10 trials per case).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from workflows.commit import LEASE_NAME, inspect_checkpoint, kept_manifests, referenced
from workflows.commit import fetch_checkpoint
from workflows.store import open_store

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "races"  # its own bucket: other modules scan theirs for leftovers
TRIALS = int(os.environ.get("BIRKHOFF_RACE_TRIALS", "1"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def race_model(tmp_path_factory) -> Path:
    """Six small weights, a bias and a config.json: a few seconds of work per run."""
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("race") / "race-model"
    d.mkdir()
    g = torch.Generator().manual_seed(3)
    sd = {f"blocks.{i}.weight": torch.randn(128, 256, generator=g) * 0.02 for i in range(6)}
    sd["head.bias"] = torch.randn(128, generator=g) * 0.01
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "race-test"}))
    return d


@pytest.fixture(scope="module")
def zoo_file(race_model, tmp_path_factory) -> Path:
    z = tmp_path_factory.mktemp("race-zoo") / "zoo.yaml"
    z.write_text(yaml.safe_dump({"name": "race", "models": [
        {"name": "race", "source": str(race_model), "config": {"points": [1600]}}]}))
    return z


class Driver:
    """One zoo run submitted to the session's Ray cluster with ``ray job submit``."""

    def __init__(self, ray_head, mlflow_server, zoo: Path, store: str, endpoint: str | None, workers: int,
                 out: Path, extra: tuple[str, ...] = ()):
        self.summary = out.with_suffix(".json")
        self.log = out.with_suffix(".log")
        args = ["--zoo", str(zoo), "--store", store, "--tracking-uri", mlflow_server.uri, "--experiment", "race",
                "--eval", "none", "--workers", str(workers), "--summary-json", str(self.summary), *extra]
        if endpoint:
            args += ["--s3-endpoint-url", endpoint]
        self._fh = open(self.log, "w")
        self.proc = ray_head.submit(args, wait=False, log=self._fh)

    def wait(self, timeout: float = 400) -> dict:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._fh.close()
        text = self.log.read_text()
        assert self.proc.returncode == 0, text[-4000:]
        assert "Traceback" not in text, text[-4000:]
        self.text = text
        return json.loads(self.summary.read_text())["models"]["race"]

    @property
    def compressed_something(self) -> bool:
        m = re.search(r"race: \d+ shard\(s\) .*?, (\d+) to compress", self.text)
        return bool(m and int(m.group(1)) > 0)


def _store_uri(kind: str, tmp: Path, name: str, seaweed) -> tuple[str, str | None]:
    if kind == "local":
        return str(tmp / name), None
    seaweed.create_bucket(BUCKET)
    return f"s3://{BUCKET}/{name}", seaweed.endpoint


def _check_committed(store, tmp: Path, superseded: set[str] = frozenset()) -> str:
    """The store holds one complete checkpoint that loads, and nothing else (but the
    ``superseded`` files of a manifest that was replaced: orphans for a later run)."""
    manifests = [k for k in store.list("") if k.endswith("/manifest.json")]
    assert len(manifests) == 1, manifests
    prefix = manifests[0][: -len("manifest.json")]
    state = inspect_checkpoint(store, prefix)
    assert state.complete, state.problems
    fetch_checkpoint(store, prefix, tmp)  # CompressedCheckpoint.load verifies every checksum and tensor
    # a --force run keeps the manifest it replaced under history/ (issue 13)
    left = {k for k in store.list(prefix) if not k.startswith(prefix + "history/")} - {prefix + n for n in superseded}
    assert left == {prefix + n for n in referenced(state.manifest)}, left
    assert prefix + LEASE_NAME not in left
    return prefix


@pytest.mark.parametrize("kind", ["local", "s3"])
@pytest.mark.parametrize("workers", [(1, 2), (2, 2)], ids=["different-plans", "same-plan"])
def test_two_drivers_race_on_one_store(kind, workers, ray_head, seaweed, mlflow_server, zoo_file, tmp_path):
    races = 0
    for trial in range(TRIALS):
        uri, endpoint = _store_uri(kind, tmp_path, f"{kind}-{workers[0]}x{workers[1]}-{trial}", seaweed)
        drivers = [Driver(ray_head, mlflow_server, zoo_file, uri, endpoint, w, tmp_path / f"t{trial}-d{i}")
                   for i, w in enumerate(workers)]
        outcomes = [d.wait() for d in drivers]
        statuses = sorted(o["status"] for o in outcomes)
        assert statuses in (["compressed", "skipped"], ["compressed", "compressed"]), outcomes
        races += all(d.compressed_something for d in drivers)
        store = open_store(uri, endpoint_url=endpoint)
        prefix = _check_committed(store, tmp_path / f"fetched-{trial}")
        assert all(o["checkpoint_uri"] == store.url(prefix) for o in outcomes)
    # how often both drivers compressed before one committed (the race proper), for the record
    print(f"\n{kind} workers {workers}: {races}/{TRIALS} trials had both drivers compress")
    if workers == (1, 2):
        # the acceptance goes on: a later run repairs what is incomplete, then skips it
        _repair_then_skip(ray_head, mlflow_server, zoo_file, uri, endpoint, store, prefix, tmp_path)
        if kind == "s3":
            _force_keeps_a_readable_checkpoint(ray_head, mlflow_server, zoo_file, uri, endpoint, store, prefix,
                                               tmp_path)


def _repair_then_skip(ray_head, mlflow_server, zoo_file, uri, endpoint, store, prefix, tmp_path):
    manifest = inspect_checkpoint(store, prefix).manifest
    names = sorted(manifest["shards"])
    store.delete(prefix + "config.json")  # a lost architecture file
    if len(names) > 1:  # a lost shard (what the overlapping runs of issue 9 left behind)
        store.delete(prefix + names[0])
        kept = len(names) - 1
    else:  # a shard overwritten by other bytes of the same size
        store.put_bytes(prefix + names[0], os.urandom(manifest["shards"][names[0]]["bytes"]))
        kept = 0
    d = Driver(ray_head, mlflow_server, zoo_file, uri, endpoint, 2, tmp_path / "repair")
    out = d.wait()
    assert out["status"] == "repaired", d.text[-3000:]
    assert "is incomplete" in d.text
    assert kept == 0 or f"{kept} shard(s) of the committed checkpoint are intact and kept" in d.text
    _check_committed(store, tmp_path / "fetched-repaired")  # rebuilt under the damaged shards' own names
    after = inspect_checkpoint(store, prefix).manifest
    assert after["tensors"] == manifest["tensors"]  # the same checkpoint again, bit for bit

    before = {i.key: (i.size, i.mtime) for i in store.list_info("")}
    d = Driver(ray_head, mlflow_server, zoo_file, uri, endpoint, 1, tmp_path / "skip")
    out = d.wait()
    assert out["status"] == "skipped" and "files verified" in d.text
    assert {i.key: (i.size, i.mtime) for i in store.list_info("")} == before  # a skip writes nothing


def _force_keeps_a_readable_checkpoint(ray_head, mlflow_server, zoo_file, uri, endpoint, store, prefix, tmp_path):
    """--force no longer un-commits first: a reader polling the store while the forced
    run works finds a complete checkpoint every time."""
    plan_before = sorted(inspect_checkpoint(store, prefix).manifest["shards"])
    workers = 2 if len(plan_before) == 1 else 1  # another plan: other shard names
    forced = Driver(ray_head, mlflow_server, zoo_file, uri, endpoint, workers, tmp_path / "forced", ("--force",))
    polls = 0
    while forced.proc.poll() is None:
        state = inspect_checkpoint(store, prefix)
        if not state.complete:
            # the manifest was replaced between reading it and checking its files (the
            # superseded shards go right after): a reader that looks again finds the new one
            again = inspect_checkpoint(store, prefix)
            assert again.complete and again.etag != state.etag, state.problems
        polls += 1
        time.sleep(0.2)
    out = forced.wait()
    assert out["status"] == "compressed" and polls > 3
    # the superseded plan's shards stay: the replaced manifest is kept under history/
    _check_committed(store, tmp_path / "fetched-forced", superseded=set(plan_before))
    kept = kept_manifests(store, prefix)
    assert len(kept) == 1 and sorted(json.loads(store.get_bytes(kept[0]))["shards"]) == plan_before
    assert sorted(inspect_checkpoint(store, prefix).manifest["shards"]) != plan_before


def test_a_forced_run_killed_at_a_random_point_leaves_a_readable_checkpoint(ray_head, seaweed, mlflow_server,
                                                                            zoo_file, tmp_path):
    """Issue 13's acceptance: while a ``--force`` run recompresses a committed model and its
    driver is SIGKILLed at a random moment, a reader polling the store finds a complete,
    loadable checkpoint every time, and the latest pointer never points elsewhere."""
    import random
    import signal
    import sys

    uri, endpoint = _store_uri("s3", tmp_path, "killed-force", seaweed)
    first = Driver(ray_head, mlflow_server, zoo_file, uri, endpoint, 1, tmp_path / "first").wait()
    assert first["status"] == "compressed"
    store = open_store(uri, endpoint_url=endpoint)
    prefix = next(k for k in store.list("race/") if k.endswith("/manifest.json"))[: -len("manifest.json")]
    seed = random.randrange(2**32)
    delay = random.Random(seed).uniform(1.0, 12.0)
    env = dict(os.environ, RAY_AUTH_MODE="disabled")  # the session's cluster runs without tokens
    forced = subprocess.Popen(
        [sys.executable, str(ROOT / "workflows" / "compress_all.py"), "--zoo", str(zoo_file), "--store", uri,
         "--s3-endpoint-url", endpoint, "--tracking-uri", mlflow_server.uri, "--experiment", "race", "--eval", "none",
         "--workers", "2", "--force", "--ray-address", ray_head.gcs],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0, polls, killed = time.monotonic(), 0, None
    while forced.poll() is None or time.monotonic() - (killed or t0) < 3.0:
        if killed is None and time.monotonic() - t0 > delay and forced.poll() is None:
            os.killpg(forced.pid, signal.SIGKILL)
            killed = time.monotonic()
        state = inspect_checkpoint(store, prefix)
        if not state.complete:  # replaced between reading the manifest and checking its files
            again = inspect_checkpoint(store, prefix)
            assert again.complete, (seed, delay, state.problems)
        latest = json.loads(store.get_bytes("race/latest.json"))
        assert latest["prefix"] == prefix, (seed, latest)
        polls += 1
        time.sleep(0.2)
        if killed is None and forced.poll() is not None:
            break  # it finished before the moment drawn: the polls above still count
    forced.wait()
    assert polls > 3, (seed, delay, polls)
    fetch_checkpoint(store, prefix, tmp_path / "after")  # loads: every checksum and tensor verified
    print(f"\nforced run {'killed after %.1f s' % delay if killed else 'finished before %.1f s' % delay}, "
          f"{polls} polls (seed {seed})")
