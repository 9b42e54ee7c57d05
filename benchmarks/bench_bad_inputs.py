"""Benchmark (issue 9's acceptance): each bad input against a normal run of the same
command, in the same run. A bad input must end with a typed error (exit status 2, no
traceback) within 60 s, using at most twice the normal run's peak memory.

    python benchmarks/bench_bad_inputs.py [--out DIR]

Prints a Markdown table: command, normal peak RSS and wall, bad peak RSS and wall,
the ratio of the two peaks, the exit status and the verdict. Each command runs in its
own child process; peak RSS is that child's ``ru_maxrss``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

LIMIT_S = 60
# runs one command and prints its exit status, wall seconds and peak RSS (KiB) as JSON
_MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "try:\n"
    "    p = subprocess.run(sys.argv[2:], capture_output=True, text=True, timeout=float(sys.argv[1]))\n"
    "    rc, err = p.returncode, p.stderr\n"
    "except subprocess.TimeoutExpired:\n"
    "    rc, err = 'timeout', ''\n"
    "print(json.dumps({'rc': rc, 'wall': time.perf_counter() - t, 'traceback': 'Traceback' in err,\n"
    "                  'rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'err': err[-300:]}))\n"
)

BILLION_LAUGHS = "models:\n  - name: a\n    source: x\n    tags:\n      a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
    f"      {c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def measure(cmd: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(LIMIT_S), *cmd], capture_output=True, text=True,
                         env=env, timeout=LIMIT_S + 60)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(d: Path) -> list[tuple[str, list[str], list[str]]]:
    """(label, normal command, bad command) triples over files made in ``d``."""
    import torch
    from safetensors.torch import save_file

    cli = [sys.executable, "-m", "compressor.cli"]
    g = torch.Generator().manual_seed(0)
    save_file({f"l{i}.weight": torch.randn(256, 255, generator=g) * 0.02 for i in range(4)}, d / "m.safetensors")
    # the paper codec's format: the decode-table case edits its U, K and bits
    subprocess.run([*cli, "compress", str(d / "m.safetensors"), str(d / "good"), "--codec", "paper"], check=True,
                   capture_output=True)
    manifest = json.loads((d / "good" / "manifest.json").read_text())

    def variant(name: str, edit) -> Path:
        shutil.copytree(d / "good", d / name)
        m = json.loads(json.dumps(manifest))
        text = edit(m)
        (d / name / "manifest.json").write_text(text if isinstance(text, str) else json.dumps(m))
        return d / name

    first = next(iter(manifest["tensors"]))
    table = variant("table", lambda m: m["tensors"][first].update(U=2**24, K=3, bits=26))
    big = variant("bigman", lambda m: json.dumps(dict(m, source={"junk": None}), sort_keys=True).replace(
        '"junk": null', '"junk": [' + "[]," * (20 * 2**20) + "[]]"))
    fifo = d / "fifo-src"
    fifo.mkdir()
    shutil.copy(d / "m.safetensors", fifo / "a.safetensors")
    os.mkfifo(fifo / "b.safetensors")
    leak = d / "leak-src"
    leak.mkdir()
    shutil.copy(d / "m.safetensors", leak / "model.safetensors")
    (leak / "config.json").symlink_to("/etc/passwd")
    huge = d / "huge.safetensors"
    save_file({"w": torch.rand(256, 256, dtype=torch.float64) * 1e300}, huge)
    (d / "zoo-ok.yaml").write_text("models:\n  - {name: a, source: x, tags: {a: b}}\n")
    (d / "zoo-laughs.yaml").write_text(BILLION_LAUGHS)
    zoo = [sys.executable, "-c", "import sys; from workflows.zoo import load_zoo; from workflows.errors import ZooError\n"
           "try:\n    load_zoo(sys.argv[1])\nexcept ZooError as e:\n    print(e, file=sys.stderr); sys.exit(2)"]
    return [
        ("inspect: 63 MB manifest of empty lists", [*cli, "inspect", str(d / "good")], [*cli, "inspect", str(big)]),
        ("decompress: U=2^24, K=3 decode table", [*cli, "decompress", str(d / "good"), str(d / "o1.safetensors")],
         [*cli, "decompress", str(table), str(d / "o2.safetensors")]),
        ("compress: FIFO named *.safetensors", [*cli, "compress", str(d / "m.safetensors"), str(d / "c1")],
         [*cli, "compress", str(fifo), str(d / "c2")]),
        ("compress: config.json -> /etc/passwd", [*cli, "compress", str(d / "m.safetensors"), str(d / "c3")],
         [*cli, "compress", str(leak), str(d / "c4")]),
        # the paper codec's float64 geometry limit (codec v2 keeps such a tensor raw: nothing to refuse)
        ("compress --codec paper: float64 near 1e300",
         [*cli, "compress", str(d / "m.safetensors"), str(d / "c5"), "--codec", "paper"],
         [*cli, "compress", str(huge), str(d / "c6"), "--codec", "paper"]),
        ("compress --overwrite onto the source", [*cli, "compress", str(d / "m.safetensors"), str(d / "c7")],
         [*cli, "compress", str(d / "m.safetensors"), str(d), "--overwrite"]),
        ("zoo: billion laughs", [*zoo, str(d / "zoo-ok.yaml")], [*zoo, str(d / "zoo-laughs.yaml")]),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one, removed after)")
    args = ap.parse_args()
    d = Path(args.out or tempfile.mkdtemp(prefix="bench-bad-"))
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(_ROOT))
    try:
        cases = build(d)
        print("| case | normal MiB / s | bad MiB / s | peak ratio | bad exit | verdict |")
        print("|---|---|---|---|---|---|")
        ok_all = True
        for label, good, bad in cases:
            a, b = measure(good, env), measure(bad, env)
            ratio = b["rss_kib"] / a["rss_kib"]
            ok = b["rc"] == 2 and not b["traceback"] and ratio <= 2.0 and b["wall"] <= LIMIT_S and a["rc"] == 0
            ok_all &= ok
            print(f"| {label} | {a['rss_kib'] / 1024:.0f} / {a['wall']:.1f} | {b['rss_kib'] / 1024:.0f} / "
                  f"{b['wall']:.1f} | {ratio:.2f} | {b['rc']} | {'ok' if ok else 'FAIL: ' + b['err'][-120:]} |")
        return 0 if ok_all else 1
    finally:
        if args.out is None:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
