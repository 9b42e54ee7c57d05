"""Benchmark: a SAM ViT-B-sized checkpoint (transformers ``SamModel(SamConfig())``,
seed-0 random init, saved locally) through the workflow with 1 and with 2 Ray
workers, against the single-process ``birkhoff compress`` of the same file in the
same run (the baseline).

    python benchmarks/bench_workers.py [--runs 1x1 2x1 1x2 1x1:64] [--points 1600] [--out DIR]

Prints a Markdown table: wall time of the whole command (Ray start included),
the model's own time in the driver, codec seconds summed over tasks, and peak
RSS per worker process (each task reports ``ru_maxrss`` of its worker).
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
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def _run(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["1x1", "2x1", "1x2", "1x1:64"],
                   help="WORKERSxCPUS_PER_TASK[:MAX_SHARD_MIB] per workflow run")
    p.add_argument("--points", default="1600")
    p.add_argument("--model", default="sam-vit-b", help="demo model name (workflows/demo_models.py)")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    a = p.parse_args(argv)

    from workflows.demo_models import build

    work = Path(a.out or tempfile.mkdtemp(prefix="birkhoff-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = build(a.model, work / "models")
    size = (src / "model.safetensors").stat().st_size
    points = [int(x) for x in a.points.split(",")]
    zoo = work / "zoo.yaml"
    zoo.write_text(json.dumps({"name": "bench", "models": [
        {"name": a.model, "source": str(src), "config": {"points": points}}]}))
    env = dict(os.environ, PYTHONPATH=str(_ROOT), BIRKHOFF_CACHE=str(work / "cache"))
    rows = []

    # baseline: one process, no Ray (what `birkhoff compress` does)
    wall, r = _run([sys.executable, "-m", "compressor.cli", "compress", str(src), str(work / "local"),
                    "--codec", "paper", "--points", a.points, "--json", "--overwrite"], env)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return 1
    base = json.loads(r.stdout.strip().splitlines()[-1])
    base_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rows.append(("birkhoff compress (1 process, baseline)", wall, wall, base["seconds"], f"{base_rss:.0f}",
                 base["ratio"]))

    for spec in a.runs:
        shape, _, shard_mib = spec.partition(":")
        n, cpt = (int(x) for x in shape.split("x"))
        summary = work / f"summary-{spec.replace(':', '-')}.json"
        cmd = [sys.executable, "workflows/compress_all.py", "--zoo", str(zoo), "--store", str(work / "store"),
               "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--workers", str(n), "--cpus-per-task",
               str(cpt), "--force", "--summary-json", str(summary)]
        if shard_mib:
            cmd += ["--max-shard-bytes", str(int(shard_mib) * 2**20)]
        wall, r = _run(cmd, env)
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
            return 1
        m = json.loads(summary.read_text())["models"][a.model]
        per_pid: dict = {}
        for s in m["shards"]:
            per_pid[s["pid"]] = max(per_pid.get(s["pid"], 0), s["peak_rss_bytes"])
        rss = " / ".join(f"{v / 2**20:.0f}" for v in per_pid.values())
        label = f"workflow, {n} worker(s) x {cpt} CPU, {len(m['shards'])} shard(s)"
        if shard_mib:
            label += f" (max {shard_mib} MiB each)"
        rows.append((label, wall, m["metrics"]["wall_seconds"], m["metrics"]["compress_seconds"], rss,
                     m["metrics"]["ratio"]))

    print(f"\n{a.model}: {size / 2**20:.0f} MiB safetensors, U={points}, {os.cpu_count()} CPU cores\n")
    print("| run | command wall s | model wall s | codec s (sum) | peak RSS per worker MiB | ratio |")
    print("|---|---|---|---|---|---|")
    for name, w, mw, cs, rss, ratio in rows:
        print(f"| {name} | {w:.1f} | {mw:.1f} | {cs:.1f} | {rss} | {ratio:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
