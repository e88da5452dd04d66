"""Chunked cross-entropy equals the plain loss, in value and in gradient, for every family."""

from __future__ import annotations

import pytest

from fixtures.gemma_fixtures import FAMILIES
from helpers import give_lora_b_values


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_and_grads_equal_plain(family, quantized, hf_model, tmp_path):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_gemma_tune import lora, losses, models

    path = hf_model(family)
    if quantized:
        from mlx_gemma_tune.convert import convert

        convert(str(path), tmp_path / "q4", quantize=4)
        path = tmp_path / "q4"
    model, config = models.load_model(path)
    mx.random.seed(0)
    lora.apply(model, config, lora.LoraSettings(rank=4, alpha=8, dropout=0.0))
    give_lora_b_values(model)
    inputs = mx.array([[2, 40, 41, 60, 71, 80, 99, 120, 150, 200, 255, 300, 310],
                       [2, 33, 47, 58, 61, 77, 0, 0, 0, 0, 0, 0, 0]])
    targets = mx.concatenate([inputs[:, 1:], mx.zeros((2, 1), dtype=inputs.dtype)], axis=1)
    mask = (targets > 0).astype(mx.float32)

    def loss(chunk, grad=True):
        def f(m):
            return losses.mean_loss(m, inputs, targets, mask, chunk, grad=grad)

        value, grads = nn.value_and_grad(model, f)(model)
        return float(value), dict(tree_flatten(grads))

    plain, g_plain = loss(None)
    scale = max(float(mx.abs(g).max()) for g in g_plain.values())  # the gradients' own scale
    lora_a = [k for k in g_plain if k.endswith("lora_a")]
    assert plain > 1.0 and scale > 0 and any(float(mx.abs(g_plain[k]).max()) > 1e-3 * scale for k in lora_a)
    # 17 target tokens: slices of 4, the last one padded with weight-0 entries. grad=True is the
    # custom function (gradient taken in the forward pass); grad=False plain autodiff over slices.
    # The two sum the same terms in another order: 1e-5 relative (~80 float32 epsilons).
    for grad in (True, False):
        chunked, g_chunked = loss(4, grad)
        assert abs(plain - chunked) < 1e-5 * plain
        assert g_plain.keys() == g_chunked.keys() and g_plain
        for k in g_plain:
            assert float(mx.abs(g_plain[k] - g_chunked[k]).max()) < 1e-5 * scale, k


def test_split_head_reproduces_the_model(hf_model):
    import mlx.core as mx
    import numpy as np

    from mlx_gemma_tune import losses, models

    x = mx.array([[2, 40, 41, 60, 71, 80, 99, 120]])
    for family in FAMILIES:
        model, _ = models.load_model(hf_model(family))
        hidden, linear, cap = losses.split_head(model)
        # exact without a soft-cap; with one, fastmath.tanh and mx.tanh agree to a few float32 ulps of 1,
        # times the cap
        bound = 0.0 if cap is None else 8 * float(np.finfo(np.float32).eps) * cap
        assert float(mx.abs(losses.head_logits(linear, cap, hidden(x)) - model(x)).max()) <= bound, family


@pytest.mark.parametrize("cap", [None, 0.7])
def test_written_out_slice_gradient_equals_autodiff(cap):
    """The chunked loss's hand-written gradient (softmax - one-hot, soft-cap derivative, head product)
    against autodiff of the plain cross-entropy, with a soft-cap small enough to bend the logits."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_gemma_tune import losses

    mx.random.seed(3)
    head = nn.Linear(16, 50, bias=False)
    h = mx.random.normal((21, 16)) * 2.0
    t = mx.random.randint(0, 50, (21,))
    w = (mx.arange(21) % 4 != 0).astype(mx.float32)  # some weight-0 positions, like padding

    def plain(h):
        z = losses.head_logits(head, cap, h)
        return (nn.losses.cross_entropy(z, t, reduction="none") * w).sum()

    value, grad = mx.value_and_grad(plain)(h)
    chunked = losses._chunked_head_loss(head, cap, 8, grad=True)
    value2, grad2 = mx.value_and_grad(lambda h: chunked(h, t, w))(h)
    assert abs(float(value) - float(value2)) < 1e-5 * abs(float(value))
    assert float(mx.abs(grad - grad2).max()) < 1e-5 * float(mx.abs(grad).max())
    if cap is not None:  # the cap bends these logits: ignoring it would be far off
        uncapped = losses._chunked_head_loss(head, None, 8, grad=True)
        assert float(mx.abs(mx.grad(lambda h: uncapped(h, t, w))(h) - grad).max()) > 1e-2
