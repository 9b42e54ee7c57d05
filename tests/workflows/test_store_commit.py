"""The store's conditional writes, the commit lease and the commit protocol, on a
local folder and on a real SeaweedFS S3 (issue 9: commits that cannot lose data)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from workflows import lease as leases
from workflows.commit import LEASE_NAME, collect_garbage, commit_checkpoint, inspect_checkpoint, kept_manifests
from workflows.errors import CommitLeaseError, ConditionFailedError, WorkflowError
from workflows.store import LocalStore, S3Store

ROOT = Path(__file__).resolve().parents[2]


BUCKET = "commit-tests"  # its own bucket: other modules scan theirs for leftovers


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    seaweed = request.getfixturevalue("seaweed")
    seaweed.create_bucket(BUCKET)
    return S3Store(f"s3://{BUCKET}/commit-{uuid.uuid4().hex[:8]}", endpoint_url=seaweed.endpoint)


def _in_threads(fn, n: int) -> None:
    """``fn(0)`` ... ``fn(n - 1)`` at once, each in its own thread."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- conditional writes ----------------------------------------------------------------

def test_create_if_absent_and_compare_and_swap(store):
    first = store.put_bytes("k/obj", b"first", if_absent=True)
    with pytest.raises(ConditionFailedError):
        store.put_bytes("k/obj", b"second", if_absent=True)
    assert store.get_bytes("k/obj") == b"first"
    # the same bytes again: an earlier attempt's write landed, nothing to do
    assert store.put_bytes("k/obj", b"first", if_absent=True).sha256 == first.sha256
    with pytest.raises(ConditionFailedError):
        store.put_bytes("k/obj", b"third", if_match='"0123456789abcdef0123456789abcdef"')
    third = store.put_bytes("k/obj", b"third", if_match=store.head("k/obj").etag)
    assert store.get_bytes("k/obj") == b"third"
    data, info = store.read("k/obj", 100)
    assert data == b"third" and info.etag == store.head("k/obj").etag and third.sha256 == info.sha256
    with pytest.raises(ConditionFailedError):
        store.delete("k/obj", if_match=first.etag)  # an older version: the object stays
    assert store.exists("k/obj")
    store.delete("k/obj", if_match=info.etag)
    assert not store.exists("k/obj")
    with pytest.raises(ConditionFailedError):
        store.delete("k/obj", if_match=info.etag)  # gone: the condition cannot hold
    with pytest.raises(ConditionFailedError):
        store.put_bytes("k/obj", b"x", if_match=info.etag)
    assert store.read("k/obj", 100) is None
    store.ensure_conditional_writes()


def test_only_one_of_many_concurrent_creates_wins(store, seaweed):
    """Eight writers, each with its own client, create one key at the same instant:
    exactly one succeeds and the object holds its bytes, round after round."""
    stores = [store] + [type(store)(store.root) if isinstance(store, LocalStore) else
                        S3Store(store.uri, endpoint_url=seaweed.endpoint) for _ in range(7)]
    for rnd in range(10):
        key = f"race/{rnd}"
        won, lost = [], []
        gate = threading.Barrier(len(stores))

        def write(i):
            gate.wait()
            try:
                stores[i].put_bytes(key, f"writer {i} ".encode() * 1000, if_absent=True)
                won.append(i)
            except ConditionFailedError:
                lost.append(i)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(lost) == len(stores) - 1, (won, lost)
        assert store.get_bytes(key) == f"writer {won[0]} ".encode() * 1000


def test_s3_conditional_multipart_upload(seaweed, tmp_path):
    seaweed.create_bucket(BUCKET)
    store = S3Store(f"s3://{BUCKET}/mpu-{uuid.uuid4().hex[:8]}", endpoint_url=seaweed.endpoint,
                    multipart_threshold=5 * 2**20, part_size=5 * 2**20)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(os.urandom(6 * 2**20))
    b.write_bytes(os.urandom(6 * 2**20))
    store.put_file("big", a, if_absent=True)
    with pytest.raises(ConditionFailedError):
        store.put_file("big", b, if_absent=True)
    assert store.get_bytes("big") == a.read_bytes()
    # the refused upload was aborted, not left behind
    assert not seaweed.client().list_multipart_uploads(Bucket=BUCKET, Prefix=store.prefix).get("Uploads")


def test_stale_multipart_uploads_only_are_aborted(seaweed):
    seaweed.create_bucket(BUCKET)
    store = S3Store(f"s3://{BUCKET}/stale-{uuid.uuid4().hex[:8]}", endpoint_url=seaweed.endpoint)
    c = seaweed.client()
    up = c.create_multipart_upload(Bucket=BUCKET, Key=f"{store.prefix}/p/live")
    assert store.abort_incomplete("p/", older_than=3600) == 0  # may be a concurrent run's upload
    assert c.list_multipart_uploads(Bucket=BUCKET, Prefix=store.prefix).get("Uploads")
    assert store.abort_incomplete("p/", older_than=0) == 1
    assert up["UploadId"] not in {u["UploadId"] for u in
                                  c.list_multipart_uploads(Bucket=BUCKET, Prefix=store.prefix).get("Uploads", [])}


def test_local_store_refuses_a_file_as_root(tmp_path):
    from workflows.errors import StoreError

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        LocalStore(f)


# -- the lease ----------------------------------------------------------------------------

def test_lease_gives_one_holder_at_a_time(store):
    inside, overlaps, order = [], [], []

    def work(i):
        with leases.acquire(store, "p/_lease", 30, poll=0.05):
            inside.append(i)
            if len(inside) > 1:
                overlaps.append(tuple(inside))
            time.sleep(0.05)
            order.append(i)
            inside.remove(i)

    _in_threads(work, 4)
    assert sorted(order) == [0, 1, 2, 3] and not overlaps
    assert not store.exists("p/_lease")  # released


def test_lease_expires_and_is_taken_over_once(store):
    old = leases.acquire(store, "p/_lease", 4)
    with pytest.raises(CommitLeaseError, match="held by"):
        leases.acquire(store, "p/_lease", 30, wait=0.2, poll=0.05)
    time.sleep(max(0.0, old.remaining) + 0.1)
    new = leases.acquire(store, "p/_lease", 30, wait=5, poll=0.05)  # the old one expired: taken over
    with pytest.raises(CommitLeaseError):
        old.renew()  # its holder learns it lost the lease and stops writing
    old.release()  # must not remove the new holder's lease
    assert json.loads(store.get_bytes("p/_lease"))["owner"] == new.token
    new.renew()
    new.release()
    assert not store.exists("p/_lease")


def test_lease_of_a_killed_process_is_taken_over_at_once(store, tmp_path):
    """A driver SIGKILLed while committing: on the same machine its lease is taken
    over without waiting for the deadline (the pid is gone)."""
    spec = json.dumps(store.spec())
    code = ("import json, os, signal, sys; sys.path.insert(0, %r)\n"
            "from workflows.store import open_store\nfrom workflows import lease\n"
            "l = lease.acquire(open_store(json.loads(%r)), 'p/_lease', 600)\n"
            "print('held', flush=True); os.kill(os.getpid(), signal.SIGKILL)\n") % (str(ROOT), spec)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ)
    assert r.returncode == -signal.SIGKILL and "held" in r.stdout, r.stderr[-2000:]
    t0 = time.monotonic()
    lease = leases.acquire(store, "p/_lease", 30, wait=5, poll=0.05)
    assert time.monotonic() - t0 < 5
    lease.release()


# -- the commit protocol ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """One small model compressed once and saved with two plans: ``a`` in one shard,
    ``b`` with one shard per tensor. Shards get plan-specific names as in the
    workflow (where the name carries the hash of the bytes), so nothing collides."""
    import torch

    from compressor import format as fmt
    from compressor.checkpoint import compress
    from compressor.config import HyperCompressionConfig

    g = torch.Generator().manual_seed(0)
    sd = {f"layer{i}.weight": torch.randn(32, 64, generator=g) * 0.02 for i in range(4)}
    ckpt = compress(sd, HyperCompressionConfig(points=(1600,)), backend="numba-cpu")
    ckpt.extra_files = {"config.json": b'{"model_type": "race"}'}
    root = tmp_path_factory.mktemp("plans")
    out = {}
    for tag, max_bytes in (("a", 1 << 30), ("b", 2000)):  # b: one 1.5 KB tensor per shard
        d = root / tag
        manifest = ckpt.save(d, max_shard_bytes=max_bytes, backend="numba-cpu")
        renames = {old: f"{tag}-{old}" for old in manifest["shards"]}
        for old, new in renames.items():
            os.replace(d / old, d / new)
        manifest["shards"] = {renames[k]: v for k, v in manifest["shards"].items()}
        for e in manifest["tensors"].values():
            e["shard"] = renames[e["shard"]]
        (d / "manifest.json").unlink()
        fmt.write_manifest(d, manifest)
        out[tag] = (d, manifest)
    assert len(out["a"][1]["shards"]) == 1 and len(out["b"][1]["shards"]) == 4
    return out


def _upload(store, prefix: str, plan) -> set[str]:
    """Upload a plan's shards and a resume record, as its run's tasks would; returns
    the keys that run owns."""
    d, manifest = plan
    for name in manifest["shards"]:
        store.put_file(prefix + name, d / name)
    work = f"{prefix}_work/{next(iter(manifest['shards']))}.json"
    store.put_bytes(work, b"{}")
    return {prefix + n for n in manifest["shards"]} | {work}


def _loads(store, prefix: str, tmp: Path) -> None:
    from workflows.commit import fetch_checkpoint

    fetch_checkpoint(store, prefix, tmp)  # CompressedCheckpoint.load: every checksum and tensor


@pytest.mark.parametrize("pair", [("a", "b"), ("b", "b")], ids=["different-plans", "same-plan"])
def test_racing_commits_one_wins_the_loser_removes_only_its_own(store, tmp_path, plans, pair):
    """Two runs commit one checkpoint at the same instant (a barrier right before the
    commit), ten times: one wins, its checkpoint loads, the loser removed only what
    it wrote that the winner does not reference."""
    for trial in range(10):
        p = f"m/src/cfg-codec1-{trial}/"
        owned = {i: _upload(store, p, plans[tag]) for i, tag in enumerate(pair)}
        seen = inspect_checkpoint(store, p)
        gate = threading.Barrier(2)
        out = {}

        def commit(i):
            d, manifest = plans[pair[i]]
            gate.wait()
            out[i] = commit_checkpoint(store, p, d, manifest, seen=seen, force=False, owned=owned[i],
                                       lease_seconds=30)

        threads = [threading.Thread(target=commit, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(o.status for o in out.values()) == ["created", "lost"], out
        winner = next(i for i, o in out.items() if o.status == "created")
        now = inspect_checkpoint(store, p)
        assert now.complete and now.manifest == plans[pair[winner]][1]
        assert out[1 - winner].manifest == now.manifest  # the loser reports the checkpoint that stands
        _loads(store, p, tmp_path / f"fetched-{trial}")
        kept = {**now.manifest["shards"], **now.manifest.get("extra_files", {})}
        want = {p + n for n in kept} | {p + "config.json", p + "manifest.json"}
        assert set(store.list(p)) == want  # the loser's shards, both resume records and the lease are gone


def test_force_replaces_only_the_version_it_saw(store, tmp_path, plans):
    p = "m/src/cfg-codec1/"
    (da, ma), (db, mb) = plans["a"], plans["b"]
    first = _upload(store, p, plans["a"])
    assert commit_checkpoint(store, p, da, ma, seen=inspect_checkpoint(store, p), force=False,
                             owned=first).status == "created"
    seen = inspect_checkpoint(store, p)
    owned = _upload(store, p, plans["b"])
    # the live checkpoint stays complete while a forced run uploads its shards
    assert inspect_checkpoint(store, p).complete
    # a forced run that saw another version than the live one loses
    other = type(seen)(etag='"0123456789abcdef0123456789abcdef"', manifest=seen.manifest)
    assert commit_checkpoint(store, p, db, mb, seen=other, force=True, owned=()).status == "lost"
    assert inspect_checkpoint(store, p).manifest == ma
    done = commit_checkpoint(store, p, db, mb, seen=seen, force=True, owned=owned)
    assert done.status == "replaced"
    now = inspect_checkpoint(store, p)
    assert now.complete and now.manifest == mb
    _loads(store, p, tmp_path / "fetched")
    # the replaced checkpoint is kept (issue 13: never deleted by default): its manifest under
    # history/, byte for byte, and its files, however old
    old_shards = {p + n for n in ma["shards"]}
    kept = kept_manifests(store, p)
    assert len(kept) == 1 and json.loads(store.get_bytes(kept[0])) == ma
    time.sleep(1.2)
    assert collect_garbage(store, p, now, orphan_age=1) == []
    assert all(store.exists(k) for k in old_shards)
    # a reader pinned to the replaced commit (a registry version records its manifest's sha256)
    # still loads it, from history/
    import hashlib

    from workflows.commit import fetch_checkpoint

    old_sha = hashlib.sha256(store.get_bytes(kept[0])).hexdigest()
    old = fetch_checkpoint(store, p, tmp_path / "replaced", manifest_sha256=old_sha)
    assert json.loads((old / "manifest.json").read_text()) == ma


def test_a_retention_drops_the_oldest_replaced_checkpoints_and_their_files(store, tmp_path, plans):
    """``keep_replaced=N``: the newest N replaced manifests stay; the files of the others
    go with the orphans once old (a reader may still be fetching them)."""
    p = "m/src/cfg-codec1/"
    (da, ma), (db, mb) = plans["a"], plans["b"]
    assert commit_checkpoint(store, p, da, ma, seen=inspect_checkpoint(store, p), force=False,
                             owned=_upload(store, p, plans["a"])).status == "created"
    owned = _upload(store, p, plans["b"])
    done = commit_checkpoint(store, p, db, mb, seen=inspect_checkpoint(store, p), force=True, owned=owned,
                             keep_replaced=0)
    assert done.status == "replaced" and store.list(p + "history/") == []
    time.sleep(1.2)
    assert set(collect_garbage(store, p, inspect_checkpoint(store, p), orphan_age=1)) == \
        {p + n for n in ma["shards"]}
    _loads(store, p, tmp_path / "fetched")


def test_commit_refuses_when_its_own_shard_vanished(store, tmp_path, plans):
    p = "m/src/cfg-codec1/"
    d, m = plans["b"]
    _upload(store, p, plans["b"])
    store.delete(p + next(iter(m["shards"])))
    with pytest.raises(WorkflowError, match="changed before the commit"):
        commit_checkpoint(store, p, d, m, seen=inspect_checkpoint(store, p), force=False, owned=())
    assert not store.exists(p + "manifest.json") and not store.exists(p + LEASE_NAME)


def test_orphans_are_collected_only_when_old(store, plans):
    p = "m/src/cfg-codec1/"
    d, m = plans["a"]
    owned = _upload(store, p, plans["a"])
    commit_checkpoint(store, p, d, m, seen=inspect_checkpoint(store, p), force=False, owned=owned)
    store.put_bytes(p + "shard-00001-of-00003-eeee.safetensors", b"orphan of a dead run")
    store.put_bytes(p + "_work/old.json", b"{}")
    state = inspect_checkpoint(store, p)
    assert collect_garbage(store, p, state, orphan_age=3600) == []  # young: maybe a live run's
    assert store.exists(p + "_work/old.json") and not store.exists(p + LEASE_NAME)
    time.sleep(1.2)
    removed = collect_garbage(store, p, state, orphan_age=1)
    assert sorted(removed) == [p + "_work/old.json", p + "shard-00001-of-00003-eeee.safetensors"]
    assert inspect_checkpoint(store, p).complete and not store.exists(p + LEASE_NAME)


def test_inspect_reports_what_is_wrong(store, plans):
    p = "m/src/cfg-codec1/"
    assert not inspect_checkpoint(store, p).committed
    d, m = plans["b"]
    _upload(store, p, plans["b"])
    commit_checkpoint(store, p, d, m, seen=inspect_checkpoint(store, p), force=False, owned=())
    assert inspect_checkpoint(store, p).complete
    first, second = list(m["shards"])[:2]
    store.delete(p + first)
    store.put_bytes(p + second, b"X" * m["shards"][second]["bytes"])  # same size, other bytes
    store.delete(p + "config.json")
    st = inspect_checkpoint(store, p)
    assert st.committed and not st.complete
    assert st.damaged == {first, second, "config.json"}
    store.put_bytes(p + "manifest.json", b"{not json")
    st = inspect_checkpoint(store, p)
    assert st.committed and not st.complete and st.manifest is None and "invalid" in st.problems[0]


def test_a_commit_replaces_an_unreadable_manifest(store, tmp_path, plans):
    p = "m/src/cfg-codec1/"
    d, m = plans["a"]
    store.put_bytes(p + "manifest.json", b"{truncated")  # what a broken writer or disk left
    owned = _upload(store, p, plans["a"])
    seen = inspect_checkpoint(store, p)
    assert seen.committed and not seen.complete
    done = commit_checkpoint(store, p, d, m, seen=seen, force=False, owned=owned)
    assert done.status == "replaced" and inspect_checkpoint(store, p).manifest == m
    _loads(store, p, tmp_path / "fetched")


# -- the latest pointer and the zoo index (issue 13) --------------------------------------

def _entry(model: str, when: str, prefix: str | None = None) -> dict:
    return {"model": model, "uri": f"s3://b/zoo/{prefix or model}/", "prefix": f"{prefix or model}/",
            "manifest_sha256": "0" * 64, "committed_at": when, "source_sha256": "1" * 64, "config_hash": "c",
            "ratio": 3.0}


def test_latest_pointer_and_index_move_forward_only_and_write_nothing_when_right(store):
    from workflows import pointers

    first = _entry("sam-b", "2026-12-01T02:00:00.000Z", "sam-b/v1")
    assert pointers.publish(store, first)
    assert pointers.read_latest(store, "sam-b")["prefix"] == "sam-b/v1/"
    etags = (store.head("sam-b/latest.json").etag, store.head("index.json").etag)
    assert not pointers.publish(store, first)  # a night on which nothing changed writes nothing
    assert (store.head("sam-b/latest.json").etag, store.head("index.json").etag) == etags
    newer = _entry("sam-b", "2026-12-02T02:00:00.000Z", "sam-b/v2")
    assert pointers.publish(store, newer)
    assert not pointers.publish(store, first)  # a late writer of an older commit does not move it back
    assert pointers.read_latest(store, "sam-b")["prefix"] == "sam-b/v2/"
    index = json.loads(store.get_bytes("index.json"))
    assert index["format"] == "birkhoff-zoo-index" and index["models"]["sam-b"]["prefix"] == "sam-b/v2/"


def test_concurrent_publishers_never_lose_an_index_entry(store):
    """Each model's driver updates the one index by compare-and-swap: none is lost."""
    from workflows import pointers

    errors = []

    def publish(i: int) -> None:
        try:
            pointers.publish(store, _entry(f"m{i}", f"2026-12-02T02:00:0{i}.000Z"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    _in_threads(publish, 6)
    assert not errors
    assert sorted(json.loads(store.get_bytes("index.json"))["models"]) == [f"m{i}" for i in range(6)]


def test_a_missing_or_foreign_pointer_is_a_typed_error(store):
    from workflows import pointers
    from workflows.errors import StoreError

    with pytest.raises(StoreError, match="no latest pointer"):
        pointers.read_latest(store, "nothing")
    store.put_bytes("odd/latest.json", b'{"format": "something-else"}')
    with pytest.raises(StoreError, match="not a birkhoff-latest v1 pointer"):
        pointers.read_latest(store, "odd")
