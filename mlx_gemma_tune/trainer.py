"""The training loop core: one optimizer step on a masked next-token loss.

Built from MLX parts (value_and_grad, optimizers); the model and its LoRA layers come
from mlx-lm. Stops on a non-finite loss or gradient instead of training on garbage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

from mlx_gemma_tune import losses
from mlx_gemma_tune.errors import UserError


class NonFiniteError(UserError):
    """The loss or the gradients became NaN/inf."""


@dataclass
class StepReport:
    step: int
    loss: float
    tokens: int
    grad_norm: float


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)
    tokens: int = 0


def make_step(model, optimizer, max_grad_norm: float | None = None):
    """A function (inputs, targets, mask) -> (loss, tokens, grad_norm) that updates the model."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    def loss_fn(m, inputs, targets, mask):
        total, count = losses.masked_cross_entropy(m, inputs, targets, mask)
        return total / mx.maximum(count, 1.0), count

    value_and_grad = nn.value_and_grad(model, loss_fn)

    def step(inputs, targets, mask):
        (loss, count), grads = value_and_grad(model, inputs, targets, mask)
        if max_grad_norm:
            grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
        else:
            norm = optim.clip_grad_norm(grads, float("inf"))[1]
        # Check before the update, so a NaN never reaches the weights.
        mx.eval(loss, norm)
        if not (math.isfinite(float(loss)) and math.isfinite(float(norm))):
            return float(loss), int(count), float(norm)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state)
        return float(loss), int(count), float(norm)

    return step


def fit(model, batches: Iterable, optimizer, *, max_grad_norm: float | None = None,
        on_step: Callable[[StepReport], None] | None = None) -> FitResult:
    """Train on every batch of `batches` once (one optimizer step each)."""
    model.train()
    step = make_step(model, optimizer, max_grad_norm)
    result = FitResult()
    for i, (inputs, targets, mask) in enumerate(batches, 1):
        loss, count, norm = step(inputs, targets, mask)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise NonFiniteError(f"training stopped at step {i}: the {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                                 f"is {loss if not math.isfinite(loss) else norm}; the weights were not updated",
                                 hint="lower the learning rate, or train in float32/bfloat16 (not float16)")
        result.losses.append(loss)
        result.tokens += count
        if on_step:
            on_step(StepReport(i, loss, count, norm))
    model.eval()
    return result
