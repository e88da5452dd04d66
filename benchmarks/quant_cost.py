"""What quantization costs: `convert --quantize` at 4 bits, 8 bits and mlx-lm's mixed recipes, one process.

    python benchmarks/quant_cost.py [--model HF_DIR] [--calibration FILE] [--recipes mixed_4_6,mixed_3_6]

Model: the bundled Gemma 3 270M's Hugging Face checkpoint unless --model is given. Each setting is a
real `convert` (mlx_gemma_tune.convert.convert) into a temporary directory; the numbers are the ones
its summary reports: perplexity of the source and the quantized model on the built-in English sample
(or --calibration), the share of positions whose greedy next token is unchanged, the largest relative
weight error of a layer, and the size on disk.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--recipes", default="mixed_4_6")
    args = ap.parse_args()

    import mlx.core as mx

    from mlx_gemma_tune import demo
    from mlx_gemma_tune.convert import convert

    source = args.model or str(demo.hf_checkpoint())
    settings = [(8, None), (4, None)] + [(4, r) for r in args.recipes.split(",") if r]  # a recipe sets its bits
    print(f"{Path(source).name}, {mx.default_device()}, mlx {mx.__version__}")
    print("| quantization | perplexity (source) | quantized | vs source | same greedy next token | worst layer "
          "(weight error) | size |")
    print("|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for bits, recipe in settings:
            r = convert(source, Path(tmp) / f"{bits}-{recipe}", quantize=bits, quant_recipe=recipe,
                        calibration=args.calibration, dtype="float32")
            q, worst = r.quality, r.quality["worst_layers"][0]
            print(f"| {recipe or f'{bits}-bit'} | {q['perplexity_source']:.3f} | {q['perplexity_quantized']:.3f} | "
                  f"{q['perplexity_quantized'] / q['perplexity_source'] - 1:+.2%} | {q['top1_agreement']:.1%} | "
                  f"{worst['path']} ({worst['bits']}-bit, {worst['rel_error']:.1%}) | {r.size_bytes / 2**20:.0f} MiB |",
                  flush=True)
    print(f"calibration: {q['text']}, {q['tokens']} tokens")


if __name__ == "__main__":
    main()
