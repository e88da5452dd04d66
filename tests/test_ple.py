"""model.ple: quantize holds the per-layer-embedding table of Gemma 3n / Gemma 4 E models 8-bit."""

from __future__ import annotations

import pytest

from helpers import run_cli

IDS = [2, 40, 41, 60, 71, 80, 99, 120, 150, 200, 255, 300]


def _ple(model):
    return next(m for p, m in model.named_modules() if p.endswith("embed_tokens_per_layer"))


@pytest.mark.parametrize("family", ["gemma3n", "gemma4_edge"])
def test_quantized_table_gives_the_plain_tables_logits_within_its_own_error(family, hf_model):
    """The quantized table changes the model only by the table's own rounding: its gathered rows are the
    dequantized table's (so the logits equal those of the model with the dequantized table, to float32
    rounding), and each value moves by at most one quantization step of its group of 64 (mlx's affine
    quantization anchors one end of the range exactly, so the error is under a step, not half one)."""
    import mlx.core as mx
    import numpy as np

    from mlx_gemma_tune import models

    model, _ = models.load_model(hf_model(family))
    table = np.array(_ple(model).weight)
    saved = models.quantize_ple(model)
    q = _ple(model)
    assert type(q).__name__ == "QuantizedEmbedding" and q.bits == 8 and q.group_size == 64
    assert saved == table.nbytes - sum(v.nbytes for v in (q.weight, q.scales, q.biases)) > 0.6 * table.nbytes
    back = np.array(mx.dequantize(q.weight, q.scales, q.biases, group_size=64, bits=8))
    groups = table.reshape(table.shape[0], -1, 64)
    step = ((groups.max(-1) - groups.min(-1)) / 255)[..., None]
    error = np.abs(back.reshape(groups.shape) - groups)
    assert (error <= step * (1 + 1e-5) + 1e-7).all() and error.mean() < 0.5 * step.mean()
    quantized_logits = np.array(model(mx.array([IDS])))

    plain, _ = models.load_model(hf_model(family))
    _ple(plain).weight = mx.array(back)
    reference = np.array(plain(mx.array([IDS])))
    assert np.abs(quantized_logits - reference).max() <= 1e-5 * np.abs(reference).max()
    assert models.quantize_ple(model) == 0  # already quantized: nothing more to save


def test_quantized_table_lowers_a_training_steps_peak(tmp_path):
    """A Gemma 4 E fixture whose per-layer table dominates (32,768 x 4 layers x 256 float32 = 128 MiB): one
    LoRA step's measured peak drops by most of what the table saves."""
    import mlx.core as mx
    import mlx.nn as nn

    from fixtures import gemma_fixtures
    from mlx_gemma_tune import lora, losses, models

    path = gemma_fixtures.build_fixture("gemma4_edge", tmp_path / "wide-ple", text_overrides=dict(
        vocab_size_per_layer_input=32768, hidden_size_per_layer_input=256))
    inputs = mx.array([IDS[:-1]])
    targets = mx.array([IDS[1:]])
    mask = mx.ones(targets.shape)
    peaks, saved = {}, 0
    for ple in ("keep", "quantize"):
        model, config = models.load_model(path)
        if ple == "quantize":
            saved = models.quantize_ple(model)
        lora.apply(model, config, lora.LoraSettings(rank=4, alpha=8, dropout=0.0))
        mx.eval(model.parameters())
        mx.clear_cache()
        mx.reset_peak_memory()
        value, grads = nn.value_and_grad(model, lambda m: losses.mean_loss(m, inputs, targets, mask))(model)
        mx.eval(value, grads)
        peaks[ple] = mx.get_peak_memory()
        del model, grads
    table = 32768 * 4 * 256 * 4  # float32 fixture
    assert saved > 0.7 * table  # 8 bits + a scale and bias per 64 values: ~28% of float32
    assert peaks["keep"] - peaks["quantize"] > 0.8 * saved, (peaks, saved)


def test_recipe_key_and_plan_follow_it(hf_model, tmp_path):
    """train applies model.ple (the default) and says so; keep leaves the table alone; the plan counts it."""
    import json

    from mlx_gemma_tune import plan

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f"A {i}."}) + "\n" for i in range(4)))
    sets = ["--set", "train.iters=1", "--set", "data.valid_fraction=0"]
    res = run_cli(["train", "--model", hf_model("gemma4_edge"), "--data", data, "-o", tmp_path / "q", *sets])
    assert res.exit_code == 0 and "per-layer-embedding table is held 8-bit" in res.stderr
    res = run_cli(["train", "--model", hf_model("gemma4_edge"), "--data", data, "-o", tmp_path / "k", *sets,
                   "--set", "model.ple=keep"])
    assert res.exit_code == 0 and "per-layer-embedding" not in res.output
    model = "google/gemma-4-E2B-it"
    quantized = plan.plan(model, plan.setups_for(model, ["gemma4-e2b-lora"]), sizes=(64,)).rows[0]
    kept = plan.plan(model, plan.setups_for(model, ["gemma4-e2b-lora"], ("model.ple=keep",)), sizes=(64,)).rows[0]
    # E2B's table: 262,144 x 35 x 256 bf16 = 4.4 GiB, 8-bit with scales ~2.5 GiB: ~2 GiB less
    assert 1.8 < kept.estimate_gb - quantized.estimate_gb < 2.3
