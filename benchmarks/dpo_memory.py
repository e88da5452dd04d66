"""Peak memory of one DPO step: our chunked log-probabilities vs the same step over full logits, one process.

    python benchmarks/dpo_memory.py [--model DIR] [--pairs 2] [--seq 1024] [--answer 512]

Model: the bundled Gemma 3 270M unless --model is given (its 262,144-token vocabulary makes the logits
the largest tensor). Both steps run the same model, LoRA adapter (rank 16 on every attention and MLP
projection), pairs, masks and reference log-probabilities, through the same preference.PreferenceLoss:
`loss_chunk 256` gathers the target positions and makes their logits 256 at a time (what `train` runs);
`full logits` (loss_chunk null) computes the logits of every position and autodiffs a log-softmax over
them, as DPO trainers built on full logits do. A pair is two rows of --seq tokens (prompt shared, the
last --answer tokens the answer). The loss values must agree (to float32 summation order).
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
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--answer", type=int, default=512)
    args = ap.parse_args()

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from mlx_gemma_tune import demo, lora, models, preference
    from mlx_gemma_tune.data import Example

    path = Path(args.model) if args.model else demo.mlx_model("float32")
    model, config = models.load_model(path)
    mx.random.seed(0)
    lora.apply(model, config, lora.LoraSettings(rank=16, alpha=32, dropout=0.0))
    rng = np.random.default_rng(0)
    prompt_len = args.seq - args.answer
    pairs = []
    for _ in range(args.pairs):
        prompt = [2] + rng.integers(3, 1000, prompt_len - 1).tolist()
        mask = [False] * prompt_len + [True] * args.answer
        chosen = Example(prompt + rng.integers(3, 1000, args.answer).tolist(), mask, "chosen")
        chosen.rejected = Example(prompt + rng.integers(3, 1000, args.answer).tolist(), mask, "rejected")
        pairs.append(chosen)
    reference = preference.reference_logps(model, pairs, args.pairs)
    inputs, targets, mask, _, extra = preference.pair_batch(pairs, reference)
    objective = preference.Objective("dpo", 0.1)

    def run(name, chunk):
        def f(m):
            return preference.PreferenceLoss(objective)(m, inputs, targets, mask, chunk=chunk, grad=True, extra=extra)[0]

        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        value, grads = nn.value_and_grad(model, f)(model)
        mx.eval(value, grads)
        return name, float(value), mx.get_peak_memory() / 2**30, time.perf_counter() - start

    rows = [run("full logits (loss_chunk null)", None), run("mlx-gemma-tune chunked (loss_chunk 256)", 256)]
    print(f"{path.name}, DPO, {args.pairs} pairs x 2 rows x {args.seq} tokens ({args.answer} answer tokens each), "
          f"{mx.default_device()}, mlx {mx.__version__}")
    print("| step | DPO loss | peak memory | time |")
    print("|---|---|---|---|")
    for name, value, peak, secs in rows:
        print(f"| {name} | {value:.6f} | {peak:.2f} GiB | {secs:.1f} s |")
    # the reference came from the chunked pass; full logits sum the same log-probabilities in another order
    # (float32, ~1,000 target tokens per row): the DPO margins differ by ~1e-3 nats at most
    assert abs(rows[0][1] - rows[1][1]) <= 1e-3 * max(abs(rows[0][1]), 1e-3), "the two losses differ"
    print(f"peak memory ratio (full logits / ours): {rows[0][2] / rows[1][2]:.2f}x")


if __name__ == "__main__":
    main()
