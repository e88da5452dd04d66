"""Where one training step's time goes, part by part (Gemma 3 270M, one ~2,000-token row by default).

    python benchmarks/step_profile.py [--model DIR] [--config seq2048] [--repeats 3]

The run is prepared exactly as benchmarks/train_speed.py prepares ours (same rows, rank-16 LoRA on every
projection, the recipe's loss chunk), then each part is timed on its own with mx.eval barriers (MLX's
lazy graph only runs when evaluated, so a part's time is the evaluation of its outputs from evaluated
inputs), uncompiled, median of --repeats after one warm-up:

  data           the micro-batch arrays and the target selection (packing.batch_arrays, select_targets)
  forward        the decoder trunk: embeddings -> final hidden states
  attention      of which: the attention cores alone (scores, softmax, values) at the model's shapes
  mlp act        of which: the MLP's GELU alone at the model's shapes (fastmath.gelu_approx)
  loss slices    the LM head + cross-entropy over the target tokens, with each slice's gradient
  backward       value_and_grad of the whole loss minus the two parts above
  optimizer      AdamW's update of the adapter
  step           the compiled step train uses (train_step.make_step), for comparison with the sum

attention and mlp act are measured apart from the trunk with the same shapes (forward + backward),
so they overlap forward and backward rather than adding to them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _timed(fn, repeats: int) -> float:
    import mlx.core as mx

    mx.eval(fn())  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _attention_time(att, tokens: int, window: int | None, repeats: int) -> float:
    """One attention core's forward + backward at this layer's shapes, through the model module's own
    mask maker and attention function (what the layer calls)."""
    import mlx.core as mx
    from mlx_lm.models import gemma3_text

    q = mx.random.normal((1, att.n_heads, tokens, att.head_dim))
    kv = mx.random.normal((1, att.n_kv_heads, tokens, att.head_dim))
    mask = gemma3_text.create_attention_mask(mx.zeros((1, tokens, 1)), None, window_size=window)

    def loss(q, k, v):
        return gemma3_text.scaled_dot_product_attention(q, k, v, cache=None, scale=att.scale, mask=mask).sum()

    grad = mx.grad(loss, argnums=(0, 1, 2))
    mx.eval(q, kv)
    return _timed(lambda: grad(q, kv, kv), repeats)


def _attention_parts(model, tokens: int, repeats: int) -> tuple[float, float]:
    """(attention cores, MLP activations) forward + backward at the model's shapes, summed over its layers."""
    import mlx.core as mx

    from mlx_gemma_tune import fastmath

    per_kind: dict[bool, float] = {}
    for layer in model.layers:
        att = layer.self_attn
        if att.is_sliding not in per_kind:
            window = model.args.sliding_window if att.is_sliding else None
            per_kind[att.is_sliding] = _attention_time(att, tokens, window, repeats)
    total_attn = sum(per_kind[layer.self_attn.is_sliding] for layer in model.layers)
    x = mx.random.normal((1, tokens, model.args.intermediate_size))
    mx.eval(x)
    act = _timed(lambda: mx.grad(lambda a: fastmath.gelu_approx(a).sum())(x), repeats)
    return total_attn, act * len(model.layers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--config", default="seq2048")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import train_speed

    from mlx_gemma_tune import demo, losses, packing, train_step

    path = Path(args.model) if args.model else demo.mlx_model()
    n, batch, seq, pw, aw, _ = train_speed.CONFIGS[args.config]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_file = work / "rows.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in train_speed.make_rows(n, pw, aw, seed=1)))
        p = train_speed._prepare(path, data_file, batch, seq, 1, work, False, False, "profile")
    model, chunk = p.model, p.recipe.train.loss_chunk
    rows = sorted(p.train, key=lambda e: -len(e.tokens))[:batch]
    parts: dict[str, float] = {}

    parts["data"] = _timed(lambda: packing.batch_arrays([[e] for e in rows]) + losses.select_targets(
        packing.batch_arrays([[e] for e in rows])[2], chunk), args.repeats)
    inputs, targets, mask, _ = packing.batch_arrays([[e] for e in rows])
    idx, weights = losses.select_targets(mask, chunk)
    hidden_fn, linear, cap = losses.split_head(model)
    model.train()
    parts["forward"] = _timed(lambda: hidden_fn(inputs), args.repeats)
    hidden = hidden_fn(inputs)
    mx.eval(hidden)
    h = hidden.reshape(-1, hidden.shape[-1])[idx]
    t = targets.reshape(-1)[idx]
    head = losses._chunked_head_loss(linear, cap, chunk, True)
    parts["loss slices"] = _timed(lambda: mx.grad(head)(h, t, weights), args.repeats)
    vg = nn.value_and_grad(model, losses.masked_cross_entropy)
    full = _timed(lambda: vg(model, inputs, targets, mask, None, chunk, (idx, weights), True), args.repeats)
    parts["backward"] = full - parts["forward"] - parts["loss slices"]
    _, grads = vg(model, inputs, targets, mask, None, chunk, (idx, weights), True)
    opt = optim.AdamW(learning_rate=1e-5)
    opt.init(model.trainable_parameters())

    def update():
        opt.update(model, grads)
        return model.trainable_parameters(), opt.state

    parts["optimizer"] = _timed(update, args.repeats)
    attn, act = _attention_parts(model, inputs.shape[1], args.repeats)
    step = train_step.make_step(model, optim.AdamW(learning_rate=1e-5), compile=True, chunk=chunk)
    parts["step (compiled)"] = _timed(lambda: step([(inputs, targets, mask)]) and mx.array(0), args.repeats)

    body = ("data", "forward", "loss slices", "backward", "optimizer")
    whole = sum(parts[k] for k in body)
    print(f"\n{path.name}, float32, {mx.default_device()}, {platform.machine()} {platform.system()}, "
          f"mlx {mx.__version__}; {batch} x {inputs.shape[1]} tokens, {int(mask.sum())} targets, "
          f"median of {args.repeats}\n")
    print("| part | seconds | share of the uncompiled step |")
    print("|---|---|---|")
    for k in body:
        print(f"| {k} | {parts[k]:.2f} | {parts[k] / whole:.0%} |")
    print(f"| attention cores (in forward + backward) | {attn:.2f} | {attn / whole:.0%} |")
    print(f"| MLP GELU (in forward + backward) | {act:.2f} | {act / whole:.0%} |")
    print(f"| uncompiled step (sum) | {whole:.2f} | 100% |")
    print(f"| compiled step (train_step.make_step) | {parts['step (compiled)']:.2f} | |")


if __name__ == "__main__":
    main()
