"""Blocked attention (attention.py) and fastmath: the same numbers as mlx-lm's dense attention and MLX's
own functions, within float32 rounding of each quantity's scale."""

import numpy as np
import pytest

from tests.fixtures.gemma_fixtures import FAMILIES

EPS = float(np.finfo(np.float32).eps)


def _segments():
    import mlx.core as mx

    seg = np.zeros((2, 70), np.int32)
    seg[0, 25:] = 1  # two packed rows
    seg[1, 61:] = -1  # right padding
    return mx.array(seg)


@pytest.mark.parametrize("window,packed,heads", [(None, False, (4, 1)), (16, False, (4, 2)), (None, True, (2, 2)),
                                                 (16, True, (4, 1))])
def test_blocked_attention_equals_the_dense_masked_softmax(window, packed, heads):
    """Values and gradients (queries, keys, values) equal mlx-lm's attention over the materialised mask,
    with blocks that do not divide the length (70 = 3 x 24 - 2)."""
    import mlx.core as mx
    from mlx_lm.models import base

    from mlx_gemma_tune import attention

    mx.random.seed(0)
    h, h_kv = heads
    q, k, v = (mx.random.normal((2, n, 70, 16)) for n in (h, h_kv, h_kv))
    band = attention.BandMask(window, _segments() if packed else None)
    dense = attention._dense(band, 70, 70)
    cot = mx.random.normal((2, h, 70, 16))

    def ours(q, k, v):
        return (attention.blocked_attention(q, k, v, 0.25, band, block=24) * cot).sum()

    def theirs(q, k, v):
        return (base.scaled_dot_product_attention(q, k, v, None, 0.25, dense) * cot).sum()

    a = attention.blocked_attention(q, k, v, 0.25, band, block=24)
    b = base.scaled_dot_product_attention(q, k, v, None, 0.25, dense)
    # each output is a convex combination of <= 70 values: rounding grows with the terms summed
    assert float(mx.abs(a - b).max()) <= 70 * EPS * float(mx.abs(v).max())
    for ga, gb in zip(mx.grad(ours, argnums=(0, 1, 2))(q, k, v), mx.grad(theirs, argnums=(0, 1, 2))(q, k, v)):
        assert float(mx.abs(ga - gb).max()) <= 70 * EPS * float(mx.abs(gb).max())


def test_keys_per_query_counts_what_the_blocks_compute():
    from mlx_gemma_tune import attention

    # 2,048 tokens, blocks of 256: causal blocks meet 256, 512, ..., 2,048 keys -> 256 * 36 * 256 / 2,048
    assert attention.keys_per_query(2048, None, 256) == 256 * 36 * 256 / 2048 == 1152
    # window 512: 256 keys, 512 keys, then 767 (the window's 511 before the block + the block) for 6 blocks
    assert attention.keys_per_query(2048, 512, 256) == (256 * 256 + 256 * 512 + 6 * 256 * 767) / 2048
    assert attention.keys_per_query(10, None, 256) == 10  # one block: every key


@pytest.mark.parametrize("family", FAMILIES)
def test_models_attend_in_blocks_and_match_the_cached_forward(family, hf_model, monkeypatch):
    """A cache-free forward (training) goes through blocked_attention, with several blocks at 8 queries
    each and windows crossing them, and gives the logits of mlx-lm's own cached forward."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_gemma_tune import attention, models

    model, _ = models.load_model(hf_model(family))
    calls = []
    real = attention.blocked_attention
    monkeypatch.setattr(attention, "BLOCK", 8)
    monkeypatch.setattr(attention, "blocked_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = mx.array([[2] + [(7 * i) % 250 + 3 for i in range(40)]])
    train = model(x)
    assert calls, "the cache-free forward did not use blocked attention"
    calls.clear()
    cached = model(x, cache=make_prompt_cache(model))
    assert not calls  # generation keeps mlx-lm's attention
    scale = float(mx.abs(cached).max())
    assert float(mx.abs(train - cached).max()) <= 1e-4 * scale, family


def test_fastmath_equals_mlx_functions_and_their_gradients():
    """exp, tanh and the tanh-GELU against MLX's own (values and derivatives), relative to the values'
    scale; fastmath's forms are what the CPU backend runs (this machine's backend)."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_gemma_tune import fastmath

    x = mx.array(np.linspace(-30, 30, 20001, dtype=np.float32))
    pairs = [(fastmath.exp, mx.exp, mx.array(np.linspace(-80, 10, 20001, dtype=np.float32))),
             (fastmath.tanh, mx.tanh, x), (fastmath.gelu_approx, nn.gelu_approx, x)]
    for ours, theirs, at in pairs:
        a, b = ours(at), theirs(at)
        assert bool(mx.all(mx.isfinite(a)))
        # both approximate the true function to ~1e-6 relative (MLX's exp: 4e-6 measured)
        assert float((mx.abs(a - b) / mx.maximum(mx.abs(b), 1.0)).max()) <= 64 * EPS, ours.__name__
        ga, gb = mx.grad(lambda t, f=ours: f(t).sum())(at), mx.grad(lambda t, f=theirs: f(t).sum())(at)
        assert float((mx.abs(ga - gb) / mx.maximum(mx.abs(gb), 1.0)).max()) <= 64 * EPS, ours.__name__
    assert float(fastmath.tanh(mx.array(100.0))) == 1.0 and float(fastmath.tanh(mx.array(-100.0))) == -1.0


def test_geglu_equals_the_product_and_its_gradients():
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_gemma_tune import fastmath

    mx.random.seed(1)
    gate, up, cot = (mx.random.normal((3, 50, 40)) * 4 for _ in range(3))
    ref = nn.gelu_approx(gate) * up
    assert float(mx.abs(fastmath.geglu(gate, up) - ref).max()) <= 64 * EPS * float(mx.abs(ref).max())
    ours = mx.grad(lambda g, u: (fastmath.geglu(g, u) * cot).sum(), argnums=(0, 1))(gate, up)
    theirs = mx.grad(lambda g, u: (nn.gelu_approx(g) * u * cot).sum(), argnums=(0, 1))(gate, up)
    for a, b in zip(ours, theirs):
        assert float(mx.abs(a - b).max()) <= 64 * EPS * float(mx.abs(b).max())
