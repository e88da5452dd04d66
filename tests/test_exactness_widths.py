"""Exact at the real widths, not only at the fixtures' hidden 64 (whose square root is exact in
bfloat16): MLX float32 through our loader against transformers in float64, whose own float32 gap
on the same input is the noise floor. A constant or cast rounded to the wrong dtype (mlx-lm's
bfloat16 embedding scale: 25.25 for sqrt(640) = 25.298) shows here as logits off by ~1e-2."""

from __future__ import annotations

import pytest

from fixtures.gemma_fixtures import build_fixture

TOKENS = [2, 33, 47, 58, 61, 77, 80, 95, 101, 120, 133, 150, 166, 181, 199, 210, 230, 245, 260, 280]
# Real widths and head sizes, few layers and the fixtures' 512-token vocabulary so they stay fast;
# the MLP and the number of heads are narrowed (no scale or cast depends on them).
REAL = {
    "gemma3-270m": ("gemma3_text", dict(hidden_size=640, intermediate_size=640, head_dim=256, num_attention_heads=2,
                                         num_key_value_heads=1, query_pre_attn_scalar=256)),
    "gemma3-1b": ("gemma3_text", dict(hidden_size=1152, intermediate_size=1152, head_dim=256, num_attention_heads=2,
                                       num_key_value_heads=1, query_pre_attn_scalar=256)),
    "gemma4-e2b": ("gemma4_edge", dict(hidden_size=1536, intermediate_size=768, head_dim=256, global_head_dim=512,
                                        num_attention_heads=2, num_key_value_heads=1, hidden_size_per_layer_input=256)),
}


def _logits(path, tokens, dtype_name: str):
    import json

    import torch
    import transformers

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(path, dtype=getattr(torch, dtype_name)).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


@pytest.mark.parametrize("name", list(REAL))
def test_float32_matches_transformers_float64_at_real_widths(name, tmp_path):
    import mlx.core as mx
    import numpy as np

    from mlx_gemma_tune import models

    family, widths = REAL[name]
    path = build_fixture(family, tmp_path / name, text_overrides=widths)
    model, _ = models.load_model(path)
    ours = np.array(model(mx.array([TOKENS]))[0].astype(mx.float32), dtype=np.float64)
    exact, fp32 = _logits(path, TOKENS, "float64"), _logits(path, TOKENS, "float32")
    floor = float(np.abs(fp32 - exact).max())  # transformers' own float32 rounding on this input
    bound = max(1e-4, 3 * floor)
    gap = float(np.abs(ours - exact).max())
    assert gap <= bound, f"{name}: MLX float32 is {gap:.2e} from transformers float64 (bound {bound:.1e})"
