"""The memory estimate against MLX's measured peak at real widths: random-weight Gemma models built at the
widths of Gemma 4 E2B, Gemma 3n E2B (the real 262,144-token vocabulary, head sizes and per-layer inputs)
and Gemma 4 31B (its widths and heads with a 65,536-token vocabulary: the real one does not build in 24 GB
with torch's initialisation), with a few layers, so they fit a small machine.

    python benchmarks/memory_shapes.py [--shapes e2b,3n-e2b,31b] [--batch 2] [--seq 512]

Each shape: the fixture builder of the test suite writes the checkpoint (float32, random weights);
then, in a fresh process, one rank-16 LoRA on every attention and MLP projection, two training steps
of the chunked loss over `batch` rows of `seq` tokens (every token a target), MLX's peak memory
against memory.estimate() for the same model, batch and rows, and the PLE table's saving
(model.ple: quantize, as train holds it) on the E models.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

F, S = "full_attention", "sliding_attention"
SHAPES = {  # family, text overrides (real widths, few layers)
    "e2b": ("gemma4_edge", dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=5, num_attention_heads=8,
                                num_key_value_heads=1, head_dim=256, global_head_dim=512, vocab_size=262144,
                                vocab_size_per_layer_input=262144, hidden_size_per_layer_input=256,
                                num_kv_shared_layers=0, layer_types=[S, S, S, S, F], sliding_window=512)),
    "3n-e2b": ("gemma3n", dict(hidden_size=2048, intermediate_size=[8192] * 5, num_hidden_layers=5,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=256, vocab_size=262400,
                               vocab_size_per_layer_input=262144, hidden_size_per_layer_input=256,
                               num_kv_shared_layers=0, layer_types=[S, S, S, S, F],
                               activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0], sliding_window=512)),
    "31b": ("gemma4_dense", dict(hidden_size=5376, intermediate_size=21504, num_hidden_layers=2, num_attention_heads=32,
                                 num_key_value_heads=16, num_global_key_value_heads=4, head_dim=256, global_head_dim=512,
                                 vocab_size=65536, layer_types=[S, F], sliding_window=1024)),
}

MEASURE = """
import json, sys
import mlx.core as mx
import mlx.optimizers as optim
from mlx_gemma_tune import data, lora, losses, memory, models, packing, train_step

path, batch, seq, ple = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model, config = models.load_model(path)
saved = models.quantize_ple(model) if ple == "quantize" else 0
mx.random.seed(0)
lora.apply(model, config, lora.LoraSettings(rank=16, alpha=32, dropout=0.0))
rows = [data.Example(tokens=[2] + [(7 * i + 11 * j) % 5000 + 3 for j in range(seq)], mask=[True] * (seq + 1),
                     source="r") for i in range(batch)]
step = train_step.make_step(model, optim.AdamW(learning_rate=1e-4), compile=False)
mx.clear_cache()
mx.reset_peak_memory()
for _ in range(2):
    step([packing.batch_arrays([[r] for r in rows])])
n = lora.trainable_parameters(model)
est = memory.estimate(config, weight_bytes=memory.model_bytes(model) - 4 * n, adapter_parameters=n,
                      batch=batch, seq_len=seq, loss_chunk=losses.DEFAULT_CHUNK, grad_checkpoint=False)
print(json.dumps({"measured": mx.get_peak_memory() / 2**30, "estimate": est.total_gb, "weights": est.weights_gb,
                  "ple_saved": saved / 2**30}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()

    import mlx.core as mx

    from fixtures import gemma_fixtures

    print(f"batch {args.batch} x {args.seq} tokens, float32, {mx.default_device()}, mlx {mx.__version__}")
    print("| shape | PLE | weights | estimate | measured | estimate / measured |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes.split(","):
            family, overrides = SHAPES[name]
            path = gemma_fixtures.build_fixture(family, Path(tmp) / name, text_overrides=overrides)
            for ple in (("keep", "quantize") if family != "gemma4_dense" else ("keep",)):
                res = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(args.batch), str(args.seq), ple],
                                     capture_output=True, text=True, check=False, cwd=ROOT)
                if res.returncode:
                    raise SystemExit(f"{name} ({ple}): {res.stderr[-3000:]}")
                got = json.loads(res.stdout.strip().splitlines()[-1])
                saved = f" (-{got['ple_saved']:.2f} GiB)" if got["ple_saved"] else ""
                print(f"| {name} | {ple}{saved} | {got['weights']:.2f} GiB | {got['estimate']:.2f} GiB | "
                      f"{got['measured']:.2f} GiB | {got['estimate'] / got['measured']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
