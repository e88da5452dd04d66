"""Shared test helpers: drive the CLI and check the rules every error must follow."""

from __future__ import annotations

import hashlib
from pathlib import Path

from click.testing import CliRunner

from mlx_gemma_tune.cli import cli


def run_cli(args: list[str], env: dict | None = None, input: str | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, input=input, catch_exceptions=False)


def snapshot(root: Path, quick: bool = False) -> dict[str, str]:
    """Every file under root with its content hash, to prove nothing was written or changed.

    quick: (size, mtime, inode) instead of the hash, for large trees (any write or atomic
    replace changes one of them).
    """
    root = Path(root)

    def key(p: Path) -> str:
        if quick:
            st = p.stat()
            return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        return hashlib.sha256(p.read_bytes()).hexdigest()

    return {
        str(p.relative_to(root)): key(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(root)) + "/": "dir" for p in root.rglob("*") if p.is_dir()}


def assert_one_line_error(result, *needles: str, code: int | None = None) -> str:
    """Non-zero exit, exactly one line on stderr starting with 'Error:', no traceback."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---- comparing two trainings of one adapter ---------------------------------------------------------
#
# Two runs that do the same arithmetic in another summation order (two ranks summing their shards,
# BLAS kernels that block sums differently, compiled vs eager) differ by ~1e-7 relative per
# float32 operation. Adam divides by sqrt(v), so a coordinate whose gradient is at that noise
# level takes a full-size step either way: single weights may then differ by a good fraction of
# the learning rate (3.4e-5 at lr 1e-3 was seen), while the adapter as a whole stays within a
# small fraction of its own movement. A real fault (a gradient not averaged, a dropped shard, a
# lost optimizer state, another data order) changes every step's update by O(1): a drift of
# order 0.1-1. So two runs are compared through their drift, relative to what training moved.
# Measured on tests/test_distributed.py (2 ranks vs 1 process, 24 steps, OpenBLAS): drift 1.3e-5;
# with the gradients not averaged across ranks, 0.41 (and summed instead of averaged, the gradient
# norms are off by 2x, which clipping and Adam would hide from the weights: hence that check too).
REORDERED_RTOL = 1e-2  # another summation order: ~1000x above the noise, ~40x below a real fault
REPEATED_RTOL = 1e-5  # the same operations in the same order (resume): ~100 float32 epsilons


def adapter_values(model) -> dict:
    """{name: float64 array} of the model's adapter as it is now (a copy)."""
    import numpy as np
    from mlx.utils import tree_flatten

    return {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(model.trainable_parameters())}


def initial_adapter(**prepare_args) -> dict:
    """adapter_values of the adapter `prepare.prepare_run(**prepare_args)` starts from."""
    from mlx_gemma_tune import prepare

    return adapter_values(prepare.prepare_run(**prepare_args).model)


def adapter_drift(got: Path, want: Path, init: dict) -> float:
    """||got - want|| / ||want - init|| over every tensor of two adapters.safetensors (float64 norms)."""
    import numpy as np
    from safetensors.numpy import load_file

    a, b = load_file(str(got)), load_file(str(want))
    assert a.keys() == b.keys() == init.keys()
    apart = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a)
    moved = sum(float(np.sum((b[k].astype(np.float64) - init[k]) ** 2)) for k in b)
    assert moved > 0, "the reference adapter never moved from its initial value"
    return (apart / moved) ** 0.5


def assert_same_training(run: Path, reference: Path, init: dict, rtol: float) -> None:
    """Two run directories trained the same adapter: the same records, and within `rtol`.

    The adapter through adapter_drift; each train / validation loss relative to how far the
    reference's losses moved over the run (to first order, a drift of r of the adapter's movement
    moves the loss by r of its own change); each gradient norm relative to itself.
    """
    import json

    got, want = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (run, reference))
    assert [(r["type"], r["step"]) for r in got] == [(r["type"], r["step"]) for r in want]
    for kind, key in (("train", "loss"), ("val", "val_loss")):
        ref = [r[key] for r in want if r["type"] == kind]
        spread = max(ref, default=0) - min(ref, default=0)
        assert len(ref) < 2 or spread > 0, f"the reference's {kind} loss never moved"
        for g, w in zip(got, want):
            if g["type"] == kind:
                assert abs(g[key] - w[key]) <= rtol * spread, (kind, w["step"], g[key], w[key], spread)
    for g, w in zip(got, want):
        if g["type"] == "train":
            assert abs(g["grad_norm"] - w["grad_norm"]) <= rtol * w["grad_norm"], (w["step"], g, w)
    drift = adapter_drift(run / "adapters.safetensors", reference / "adapters.safetensors", init)
    assert drift <= rtol, f"the adapters ended {drift:.2e} of their movement apart (allowed {rtol:.0e})"


# ---- comparing logits ---------------------------------------------------------------------------------
#
# Two float32 computations of the same forward pass (MLX and transformers, a fused model and its
# base + adapter, another BLAS) differ by rounding that grows with depth and width, relative to
# the logits' own scale. 1e-4 of the largest logit (~1,700 float32 epsilons) holds for every
# fixture family; a wrong scale, norm, cast or weight moves the logits by 1e-2 or more of it
# (Gemma 3's embedding scale rounded to bf16 alone is 2e-3 of the scale factor).
LOGITS_RTOL = 1e-4


def rel_diff(got, want) -> float:
    """max |got - want| / max |want| of two arrays (numpy, MLX or torch on the CPU), in float64."""
    import numpy as np

    a, b = (np.asarray(x, dtype=np.float64) for x in (got, want))
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(np.abs(b).max())
    assert scale > 0, "the reference is all zeros"
    return float(np.abs(a - b).max()) / scale


def assert_logits_close(got, want, rtol: float = LOGITS_RTOL, what: str = "") -> None:
    """got equals want within rtol of want's largest magnitude (see LOGITS_RTOL)."""
    diff = rel_diff(got, want)
    assert diff <= rtol, f"{what}: max |logit diff| is {diff:.2e} of the logit scale (allowed {rtol:.0e})"


def give_lora_b_values(model, scale: float = 0.05) -> None:
    """Set every lora_b (mlx-lm starts them at 0) to N(0, scale^2), so the adapter changes the model
    and every LoRA matrix gets a gradient (with lora_b = 0 the lora_a gradients are exactly 0)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    model.load_weights([(n, scale * mx.random.normal(p.shape)) for n, p in tree_flatten(model.trainable_parameters())
                        if n.endswith("lora_b")], strict=False)


def chat_prompt_tokens(tok, messages: list[dict], thinking: bool = False, tools: list[dict] | None = None) -> list[int]:
    """What `chat` / `generate` send for `messages`: ChatSession's own rendering, without a model."""
    from mlx_gemma_tune.generate import ChatSession

    session = ChatSession.__new__(ChatSession)
    session.tokenizer, session.thinking, session.tools = tok, thinking, tools
    return session.prompt_tokens(messages)


def trained_runs(ex) -> list[tuple[int, int]]:
    """(start, end) of every run of trained tokens of a data.Example."""
    out, start = [], None
    for i, m in enumerate([*ex.mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out
