"""Losses. The model's logits already carry Gemma's final soft-cap."""

from __future__ import annotations


def masked_cross_entropy(model, inputs, targets, mask):
    """(sum of token losses, number of target tokens) over the masked positions, in float32."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = model(inputs).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")
    ce = mx.where(mask > 0, ce, 0.0)  # pad positions never reach the sum, even if non-finite
    return ce.sum(), mask.sum()


def mean_loss(model, inputs, targets, mask):
    """Mean token loss of a batch: what a training step minimises."""
    import mlx.core as mx

    total, count = masked_cross_entropy(model, inputs, targets, mask)
    return total / mx.maximum(count, 1.0)
