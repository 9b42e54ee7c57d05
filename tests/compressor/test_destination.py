"""Destinations are never clobbered: what ``compress``/``save`` and ``decompress``
refuse, the atomic no-clobber publish, races between runs, and the clean-up of
what killed runs left behind. Every refusal is a typed error (exit status 2 from
the CLI) naming the path, and nothing outside the destination changes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from compressor import destination as dest
from compressor import temp_names
from compressor.checkpoint import CompressedCheckpoint, check_destination, compress, replaceable_checkpoint
from compressor.cli import main
from compressor.config import HyperCompressionConfig
from compressor.errors import CheckpointExistsError, DestinationError

ROOT = Path(__file__).resolve().parents[2]
CFG = HyperCompressionConfig(points=(1225,))


def _sd(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}.weight": torch.randn(32, 31, generator=g) * 0.02 for i in range(n)}


@pytest.fixture
def work(tmp_path):
    """A source file and a compressed checkpoint of it, side by side."""
    src = tmp_path / "m.safetensors"
    save_file(_sd(), src)
    ckpt = compress(str(src), CFG, backend="reference")
    ckpt.save(tmp_path / "c", backend="reference")
    return tmp_path, src, ckpt


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = os.lstat(p)
            body = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), len(body), hash(body))
    return out


def run_cli(capsys, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    return rc, err


# -- compress: what is refused, before any work -----------------------------------------

def test_overwrite_replaces_only_a_birkhoff_checkpoint(work, capsys):
    tmp, src, ckpt = work
    (tmp / "folder").mkdir()
    (tmp / "folder" / "notes.txt").write_text("mine")
    before = snapshot(tmp)
    rc, err = run_cli(capsys, "compress", src, tmp / "folder", "--overwrite", "--backend", "reference")
    assert rc == 2 and "CheckpointExistsError" in err and "not one" in err and str(tmp / "folder") in err
    assert snapshot(tmp) == before
    # a checkpoint with a foreign file in it is not only a checkpoint: kept too
    (tmp / "c" / "report.parquet").write_bytes(b"x")
    assert "report.parquet" in replaceable_checkpoint(tmp / "c")
    before = snapshot(tmp)
    rc, err = run_cli(capsys, "compress", src, tmp / "c", "--overwrite", "--backend", "reference")
    assert rc == 2 and "report.parquet" in err
    assert snapshot(tmp) == before
    # a real checkpoint is replaced, in one step
    (tmp / "c" / "report.parquet").unlink()
    rc, err = run_cli(capsys, "compress", src, tmp / "c", "--overwrite", "--backend", "reference")
    assert rc == 0, err
    assert replaceable_checkpoint(tmp / "c") is None
    assert not [p for p in tmp.iterdir() if p.name.startswith(".c.")]


@pytest.mark.parametrize("where", ["same-file", "same-dir", "inside-src", "src-inside-dst", "src-file-inside"])
def test_destination_never_overlaps_the_source(tmp_path, capsys, where):
    d = tmp_path / "model"
    d.mkdir()
    save_file(_sd(), d / "model.safetensors")
    (d / "config.json").write_text("{}")
    src, dst = {
        "same-file": (d / "model.safetensors", d / "model.safetensors"),
        "same-dir": (d, d),
        "inside-src": (d, d / "compressed"),
        "src-inside-dst": (d, tmp_path),
        "src-file-inside": (d / "model.safetensors", d),
    }[where]
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        rc, err = run_cli(capsys, "compress", src, dst, *extra, "--backend", "reference")
        assert rc == 2 and "Traceback" not in err, err
        assert "DestinationError" in err and "overlaps the source" in err
    assert snapshot(tmp_path) == before


def test_bad_parent_is_refused_before_compressing(tmp_path, capsys):
    src = tmp_path / "m.safetensors"
    save_file(_sd(), src)
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    rc, err = run_cli(capsys, "compress", src, tmp_path / "afile" / "c")
    assert rc == 2 and "DestinationError" in err and "afile" in err and "not a directory" in err
    assert "param" not in err  # no progress bar: refused before the first tensor
    rc, err = run_cli(capsys, "compress", src, tmp_path / "afile" / "deeper" / "c")
    assert rc == 2 and "not a directory" in err
    rc, err = run_cli(capsys, "compress", src, tmp_path / "afile", "--overwrite")
    assert rc == 2 and "CheckpointExistsError" in err and "regular file" in err
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_parent_is_refused_before_compressing(tmp_path, capsys):
    src = tmp_path / "m.safetensors"
    save_file(_sd(), src)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, err = run_cli(capsys, "compress", src, ro / "c")
        assert rc == 2 and "not writable" in err and "param" not in err
    finally:
        ro.chmod(0o755)


def test_check_destination_api(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DestinationError, match="not a directory"):
        check_destination(tmp_path / "f" / "c")
    assert check_destination(tmp_path / "a" / "b" / "c") == [str(tmp_path / "a"), str(tmp_path / "a" / "b")]
    (tmp_path / "empty").mkdir()
    assert check_destination(tmp_path / "empty") == []  # an empty directory is free
    with pytest.raises(DestinationError, match="overlaps"):
        check_destination(tmp_path / "x", protected=[tmp_path])
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(CheckpointExistsError, match="symbolic link"):
        check_destination(tmp_path / "link", overwrite=True)


def test_save_creates_missing_parents_and_removes_them_on_failure(tmp_path):
    ck = compress(_sd(), CFG, backend="reference")
    ck.save(tmp_path / "p" / "q" / "c", backend="reference")
    assert replaceable_checkpoint(tmp_path / "p" / "q" / "c") is None
    bad = CompressedCheckpoint(ck.entries, ck.config, {}, {"../escape.json": b"{}"})
    from compressor.errors import ConfigError

    with pytest.raises(ConfigError):
        bad.save(tmp_path / "r" / "s" / "c", backend="reference")
    assert not (tmp_path / "r").exists()  # created for the save, removed with it


def test_api_save_protects_the_source(tmp_path):
    src = tmp_path / "m.safetensors"
    save_file(_sd(), src)
    ck = compress(str(src), CFG, backend="reference")
    with pytest.raises(DestinationError, match="overlaps"):
        ck.save(tmp_path, overwrite=True, backend="reference")
    with pytest.raises(DestinationError, match="overlaps"):
        ck.save(src, overwrite=True, backend="reference")
    assert src.is_file()


# -- the atomic publish --------------------------------------------------------------------

def test_rename_noreplace_never_replaces(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x").write_text("new")
    b.mkdir()  # even an empty directory is not replaced by the primitive itself
    with pytest.raises(FileExistsError):
        dest.rename_noreplace(a, b)
    b.rmdir()
    dest.rename_noreplace(a, b)
    assert (b / "x").read_text() == "new" and not a.exists()
    f, g = tmp_path / "f", tmp_path / "g"
    f.write_text("1")
    g.write_text("2")
    with pytest.raises(FileExistsError):
        dest.rename_noreplace(f, g)
    assert g.read_text() == "2" and f.read_text() == "1"


def test_directory_appearing_during_the_save_is_never_touched(work, monkeypatch):
    tmp, src, ckpt = work
    target = tmp / "new"
    real_write_manifest = __import__("compressor.format", fromlist=["x"]).write_manifest

    def intruder(directory, manifest):  # someone creates the destination mid-save
        target.mkdir()
        (target / "theirs.txt").write_text("keep me")
        return real_write_manifest(directory, manifest)

    monkeypatch.setattr("compressor.format.write_manifest", intruder)
    for overwrite in (False, True):
        with pytest.raises(CheckpointExistsError):
            ckpt.save(target, overwrite=overwrite, backend="reference")
        assert sorted(os.listdir(target)) == ["theirs.txt"]
        assert (target / "theirs.txt").read_text() == "keep me"
        assert not [p for p in tmp.iterdir() if p.name.startswith(".new.")]
        (target / "theirs.txt").unlink()
        target.rmdir()


def test_overwrite_swaps_in_one_step_and_keeps_a_changed_destination(work, monkeypatch):
    tmp, src, ckpt = work
    old = json.loads((tmp / "c" / "manifest.json").read_text())
    ck2 = compress(_sd(seed=5), CFG, backend="reference")
    ck2.save(tmp / "c", overwrite=True, backend="reference")
    new = json.loads((tmp / "c" / "manifest.json").read_text())
    assert new["tensors"] != old["tensors"] and replaceable_checkpoint(tmp / "c") is None
    # the checkpoint is replaced by an unrelated folder while the save runs: kept
    real = dest.rename_exchange
    calls = []

    def swap(a, b):
        if not calls:
            calls.append(1)
            (Path(b) / "manifest.json").unlink()
            (Path(b) / "theirs.txt").write_text("keep me")
        return real(a, b)

    monkeypatch.setattr(dest, "rename_exchange", swap)
    with pytest.raises(CheckpointExistsError):
        ckpt.save(tmp / "c", overwrite=True, backend="reference")
    assert (tmp / "c" / "theirs.txt").read_text() == "keep me"
    assert not [p for p in tmp.iterdir() if p.name.startswith(".c.tmp")]


def test_two_concurrent_compress_one_destination_exactly_one_wins(tmp_path):
    src = tmp_path / "m.safetensors"
    save_file(_sd(n=6), src)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for trial in range(2):
        dst = tmp_path / f"out{trial}"
        procs = [subprocess.Popen([sys.executable, "-m", "compressor.cli", "compress", str(src), str(dst),
                                   "--backend", "reference", "--codec", "paper", "--points", "1225", "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        rcs = sorted(p.returncode for p in procs)
        errs = "".join(e for _, e in outs)
        assert rcs == [0, 2], errs[-3000:]
        assert "CheckpointExistsError" in errs and "Traceback" not in errs
        assert replaceable_checkpoint(dst) is None
        CompressedCheckpoint.load(dst)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".out{trial}.")]


# -- leftovers of killed runs ------------------------------------------------------------------

def _dead_owner_name(final: str) -> str:
    """A temporary name whose owner was a process of this host that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=60)
    return f".{final}.tmp-{temp_names._HOST}{temp_names._BOOT}-{p.pid}-0-0badc0de"


def test_stale_temporaries_are_removed_live_ones_kept(work):
    tmp, src, ckpt = work
    dead = tmp / _dead_owner_name("c2")
    dead.mkdir()
    (dead / "shard-00000.safetensors").write_bytes(b"partial")
    live = tmp / dest.temp_name("c2")  # this process: alive
    live.mkdir()
    other = tmp / ".c2.tmp-someone-elses"  # not our naming: never touched
    other.mkdir()
    dead_file = tmp / _dead_owner_name("c2")
    dead_file.write_bytes(b"x")
    ckpt.save(tmp / "c2", backend="reference")
    assert not dead.exists() and not dead_file.exists()
    assert live.is_dir() and other.is_dir()
    # a legacy name (no owner) is removed only once old
    legacy = tmp / ".c3.tmp-0123abcd"
    legacy.mkdir()
    assert dest.clean_stale_temps(tmp, "c3") == []
    old = time.time() - temp_names.LEGACY_STALE_SECONDS - 60
    os.utime(legacy, (old, old))
    assert dest.clean_stale_temps(tmp, "c3") == [str(legacy)]
    legacy_old = tmp / ".c3.old-89abcdef"  # an older build's replaced checkpoint
    legacy_old.mkdir()
    os.utime(legacy_old, (old, old))
    assert dest.clean_stale_temps(tmp, "c3") == [str(legacy_old)]


def test_killed_save_leaves_nothing_the_next_run_keeps(tmp_path):
    """SIGKILL in the middle of a save (after the shards, before the publish)."""
    src = tmp_path / "m.safetensors"
    save_file(_sd(n=4), src)
    code = ("import os, signal, sys\n"
            "import compressor.format as fmt\n"
            "real = fmt.write_manifest\n"
            "def die(d, m):\n"
            "    real(d, m); os.kill(os.getpid(), signal.SIGKILL)\n"
            "fmt.write_manifest = die\n"
            "from compressor.cli import main\n"
            f"main(['compress', {str(src)!r}, {str(tmp_path / 'c')!r}, '--backend', 'reference'])\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    left = [n for n in os.listdir(tmp_path) if n.startswith(".c.tmp-")]
    assert len(left) == 1 and not (tmp_path / "c").exists()
    ck = compress(str(src), CFG, backend="reference")
    ck.save(tmp_path / "c", backend="reference")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".c.")] == []


def test_ctrl_c_stops_compress_and_leaves_nothing(tmp_path):
    src = tmp_path / "m.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({f"l{i}.weight": torch.randn(256, 255, generator=g) * 0.02 for i in range(40)}, src)
    pts = ",".join(str(1225 + 100 * i) for i in range(30))  # a long search: still running when interrupted
    p = subprocess.Popen([sys.executable, "-m", "compressor.cli", "compress", str(src), str(tmp_path / "c"),
                          "--backend", "reference", "--codec", "paper", "--points", pts, "--target-mae", "0",
                          "--fallback-mae", "1"],
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    seen = ""
    deadline = time.time() + 300
    while "param" not in seen and time.time() < deadline:  # the progress bar: compressing has begun
        ch = p.stderr.read(1)
        if not ch:
            break
        seen += ch
    p.send_signal(signal.SIGINT)
    t0 = time.time()
    rc = p.wait(timeout=60)
    rest = p.stderr.read()
    assert rc == 130 and time.time() - t0 < 60, rest[-2000:]
    assert "interrupted" in rest and "Traceback" not in rest
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


# -- decompress and report outputs -----------------------------------------------------------

def test_decompress_refusals(work, capsys):
    tmp, src, ckpt = work
    c = tmp / "c"
    (tmp / "adir").mkdir()
    os.mkfifo(tmp / "fifo")
    before = snapshot(tmp)
    cases = [
        (src, [], "DestinationError", "same file"),  # the original model: never replaced
        (src, ["--overwrite"], "DestinationError", "same file"),
        (c / "manifest.json", ["--overwrite"], "DestinationError", "inside"),
        (c / "extra.safetensors", [], "DestinationError", "inside"),
        (tmp / "adir", ["--overwrite"], "DestinationError", "directory"),
        (tmp / "fifo", ["--overwrite"], "DestinationError", "FIFO"),
        (tmp / "missing" / "d.safetensors", [], "DestinationError", "does not exist"),
        (src / "d.safetensors", [], "DestinationError", "not a directory"),
    ]
    if os.path.exists("/dev/null"):
        cases.append(("/dev/null", ["--overwrite"], "DestinationError", "character device"))
    for out, extra, err_type, needle in cases:
        rc, err = run_cli(capsys, "decompress", c, out, *extra)
        assert rc == 2 and err_type in err and needle in err and "Traceback" not in err, (out, err)
    assert snapshot(tmp) == before
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    # a hard link to a checkpoint file elsewhere is that file: never replaced
    os.link(c / "manifest.json", tmp / "linked.json")
    rc, err = run_cli(capsys, "decompress", c, tmp / "linked.json", "--overwrite")
    assert rc == 2 and "same file" in err
    # a plain new file works; an existing one only with --overwrite
    rc, err = run_cli(capsys, "decompress", c, tmp / "d.safetensors")
    assert rc == 0, err
    mode = stat.S_IMODE(os.stat(tmp / "d.safetensors").st_mode)
    assert mode & 0o444 == 0o444 or mode & 0o400  # readable, not safetensors' private 0600 by force
    rc, err = run_cli(capsys, "decompress", c, tmp / "d.safetensors")
    assert rc == 2 and "--overwrite" in err
    rc, err = run_cli(capsys, "decompress", c, tmp / "d.safetensors", "--overwrite")
    assert rc == 0, err
    assert not [n for n in os.listdir(tmp) if ".tmp" in n]


def test_publish_file_cleans_its_temporary_on_failure(tmp_path):
    def boom(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        dest.publish_file(boom, tmp_path / "out.bin", overwrite=False)
    assert os.listdir(tmp_path) == []
    # something appears at the output while writing: kept, the new file dropped
    def racer(tmp):
        Path(tmp).write_bytes(b"new")
        (tmp_path / "out.bin").write_bytes(b"theirs")

    with pytest.raises(CheckpointExistsError):
        dest.publish_file(racer, tmp_path / "out.bin", overwrite=False)
    assert (tmp_path / "out.bin").read_bytes() == b"theirs" and os.listdir(tmp_path) == ["out.bin"]
    # ... and a directory appearing there is never replaced, even with overwrite
    (tmp_path / "out.bin").unlink()

    def dir_racer(tmp):
        Path(tmp).write_bytes(b"new")
        (tmp_path / "out.bin").mkdir()

    with pytest.raises(DestinationError):
        dest.publish_file(dir_racer, tmp_path / "out.bin", overwrite=True)
    assert (tmp_path / "out.bin").is_dir() and os.listdir(tmp_path) == ["out.bin"]


def test_inspect_parquet_output_follows_the_same_rules(work, capsys):
    tmp, src, ckpt = work
    rc, err = run_cli(capsys, "inspect", tmp / "c", "--parquet", tmp / "c" / "r.parquet")
    assert rc == 2 and "inside" in err and not (tmp / "c" / "r.parquet").exists()
    rc, _ = run_cli(capsys, "inspect", tmp / "c", "--parquet", tmp / "r.parquet", "--json")
    assert rc == 0 and (tmp / "r.parquet").is_file()
    rc, err = run_cli(capsys, "inspect", tmp / "c", "--parquet", tmp / "r.parquet")
    assert rc == 2 and "--overwrite" in err
    rc, err = run_cli(capsys, "inspect", tmp / "c", "--parquet", src, "--overwrite")
    assert rc == 0  # a plain file, asked for: replaced (inspect does not read the source)


def test_inspect_escapes_markup_in_names(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per row: the names are checked whole
    sd = {"[/x] [bold]w[/bold]": torch.randn(8, 8) * 0.02, "ok": torch.randn(8, 8) * 0.02}
    compress(sd, CFG, backend="reference").save(tmp_path / "[/c]", backend="reference")
    rc = main(["inspect", str(tmp_path / "[/c]")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "[/x] [bold]w[/bold]" in out.out
    # the title (the path) wraps at the table's width, which a long TMPDIR exceeds
    assert "[/c]" in "".join(out.out.split())
