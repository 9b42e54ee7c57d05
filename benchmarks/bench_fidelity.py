"""Accuracy against compression: box-prompt mIoU drop of the trained SAM under several codec settings.

    python benchmarks/bench_fidelity.py [--images 48] [--model eval_jobs/trained/sam-shapes] [--out FILE]

The baseline is the uncompressed model on the same held-out synthetic images
(``eval_jobs.fidelity``, seed 7): each row is a codec setting, with the
original's mIoU, the compressed model's, the drop (the product promises at most
0.01), the fidelity (mIoU of the compressed masks against the original's), the
share of elements the codec encoded and the compression ratio.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def settings():
    from compressor.config import HyperCompressionConfig

    return {
        "default (l=0.1, U=[1225,1600])": HyperCompressionConfig(),
        "demo zoo SAM (U=[1600])": HyperCompressionConfig(points=(1600,)),
        "U=[400], no fallback": HyperCompressionConfig(points=(400,), fallback_mae=1.0),
        "U=[100], no fallback": HyperCompressionConfig(points=(100,), fallback_mae=1.0),
        # the setting tests/eval_jobs/test_fidelity_regression.py must see fail: no raw
        # fallback at all (the relative one's default 0.5 would keep nearly every tensor raw)
        "coarse (test): l=0.8, U=[16], K=1, no fallback": HyperCompressionConfig(
            box_size=0.8, points=(16,), max_classes=1, target_mae=1.0, fallback_mae=1.0, relative_fallback=None),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--model", default=str(ROOT / "eval_jobs" / "trained" / "sam-shapes"))
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from eval_jobs.fidelity import fidelity_check

    lines = [f"### Fidelity of `{Path(a.model).name}` ({datetime.date.today()}, {platform.machine()}, "
             f"{a.images} held-out images)", "",
             f"`{' '.join(shlex.quote(x) for x in ['python', 'benchmarks/bench_fidelity.py', *(argv or sys.argv[1:])])}`",
             "", "| codec setting | box mIoU original | compressed | drop | fidelity | encoded | ratio | 1 % promise |",
             "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="bench-fidelity-") as tmp:
        for name, cfg in settings().items():
            r = fidelity_check(a.model, cfg, n_images=a.images, work_dir=tmp)
            lines.append(f"| {name} | {r.miou_original:.4f} | {r.miou_compressed:.4f} | {r.drop:+.4f} | "
                         f"{r.fidelity:.4f} | {100 * r.compressed_fraction:.1f} % | {r.ratio:.2f}x | "
                         f"{'kept' if r.passed else 'BROKEN'} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
