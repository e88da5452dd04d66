"""Peak memory of one LoRA step's loss + backward: plain mlx-lm loss vs our chunked loss, same process.

    python benchmarks/loss_memory.py [--model DIR] [--batch 4] [--seq 1024]

Model: the bundled Gemma 3 270M unless --model is given (its 262k-vocab logits dominate memory).
Both losses run on the same model, adapter, batch and masks; the values must agree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    args = ap.parse_args()

    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import default_loss

    from mlx_gemma_tune import demo, lora, losses, models

    path = Path(args.model) if args.model else demo.mlx_model()
    model, config = models.load_model(path)
    mx.random.seed(0)
    lora.apply(model, config, lora.LoraSettings(rank=16, alpha=32, dropout=0.0))
    vocab = 1000
    tokens = mx.random.randint(3, vocab, (args.batch, args.seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = mx.ones(targets.shape)
    lengths = mx.array([[0, args.seq]] * args.batch)

    def run(name, fn):
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        value, grads = nn.value_and_grad(model, fn)(model)
        mx.eval(value, grads)
        secs = time.perf_counter() - start
        return name, float(value), mx.get_peak_memory() / 2**30, secs

    rows = [
        run("mlx-lm default_loss", lambda m: default_loss(m, tokens, lengths)[0]),
        run(f"mlx-gemma-tune chunked ({losses.DEFAULT_CHUNK})", lambda m: losses.mean_loss(m, inputs, targets, mask, grad=True)),
    ]
    print(f"{path.name}, batch {args.batch} x {args.seq} tokens, {mx.default_device()}")
    print("| loss | value | peak memory | time |")
    print("|---|---|---|---|")
    for name, value, peak, secs in rows:
        print(f"| {name} | {value:.5f} | {peak:.2f} GiB | {secs:.1f} s |")
    print(f"peak memory ratio (mlx-lm / ours): {rows[0][2] / rows[1][2]:.2f}x")


if __name__ == "__main__":
    main()
