"""One optimizer step of LoRA / QLoRA / DoRA training (make_step), and a minimal loop over batches
(fit) for tests and scripts; trainer.py runs whole training runs on make_step."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mlx_gemma_tune import losses
from mlx_gemma_tune.errors import NonFiniteError
from mlx_gemma_tune.train_state import LossFunction


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


def make_step(model, optimizer, max_grad_norm: float | None = None, *, compile: bool = True,
              chunk: int | None = losses.DEFAULT_CHUNK, world=None, loss: LossFunction | None = None):
    """A function (micro_batches) -> (loss, tokens, grad_norm, updated) doing one optimizer step.

    A micro-batch is (inputs, targets, mask) or (inputs, targets, mask, segments) for packed
    rows. Gradients of the summed token loss are accumulated over the micro-batches and divided
    by their total target-token count, so accumulation equals one large batch exactly. With a
    distributed `world` the micro-batches are this rank's shards (possibly none) and the sums are
    combined over the ranks first (mlx.nn.average_gradients x world size, all_sum of the counts),
    so the step equals one process running the global batch; loss and norm are global.
    Nothing is updated when the loss or the gradient norm is not finite. compile: the loss and
    gradient computation runs under mx.compile (the same numbers, tests/test_packing.py). loss: the
    objective (train_state.LossFunction), losses.masked_cross_entropy by default; a loss that returns a
    third value (statistics, summed over micro-batches and ranks like the loss) leaves their sums of
    the last step in step.aux (None otherwise).
    """
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    from mlx_gemma_tune import distributed

    world = world or distributed.SINGLE
    n_stats = len(getattr(loss, "stats", ()))  # statistics a loss returns beside its value
    value_and_grad = nn.value_and_grad(model, loss or losses.masked_cross_entropy)  # (token-loss sum, count)

    def plain(inputs, targets, mask, idx, weights):
        return value_and_grad(model, inputs, targets, mask, None, chunk, (idx, weights), True)

    def packed(inputs, targets, mask, segments, idx, weights):
        return value_and_grad(model, inputs, targets, mask, segments, chunk, (idx, weights), True)

    def with_images(inputs, targets, mask, extra, idx, weights):  # not compiled: image sizes vary row to row
        return value_and_grad(model, inputs, targets, mask, None, chunk, (idx, weights), True, extra)

    def with_reference(inputs, targets, mask, reference, idx, weights):  # DPO pairs (preference.pair_batch)
        return value_and_grad(model, inputs, targets, mask, None, chunk, (idx, weights), True,
                              {"reference": reference})

    if compile:
        # value_and_grad puts its (traced) parameters into the model, and dropout advances the
        # random state: both are outputs too, as in mlx-lm's compiled step
        state = [model.state, mx.random.state]
        plain = mx.compile(plain, inputs=state, outputs=state)
        packed = mx.compile(packed, inputs=state, outputs=state)
        with_reference = mx.compile(with_reference, inputs=state, outputs=state)
    dummy = mx.zeros((1,), dtype=mx.int32), mx.zeros((1,))

    def step(micro_batches):
        grads, total, count, aux = None, mx.array(0.0), mx.array(0.0), None
        for inputs, targets, mask, *rest in micro_batches:
            segments, extra = (list(rest) + [None, None])[:2]
            selected = losses.select_targets(mask, chunk) if chunk else dummy
            if extra and set(extra) == {"reference"}:
                out, g = with_reference(inputs, targets, mask, extra["reference"], *selected)
            elif extra:
                out, g = with_images(inputs, targets, mask, extra, *selected)
            elif segments is None:
                out, g = plain(inputs, targets, mask, *selected)
            else:
                out, g = packed(inputs, targets, mask, segments, *selected)
            s, n = out[0], out[1]
            if len(out) > 2:  # a loss with statistics (preference.PreferenceLoss): summed like the loss
                aux = out[2] if aux is None else aux + out[2]
            grads = g if grads is None else tree_map(mx.add, grads, g)
            total, count = total + s, count + n
            mx.eval(grads, total, count, *([aux] if aux is not None else []))
        if world.distributed:
            if grads is None:  # no rows of this global batch fell to this rank
                grads = tree_map(mx.zeros_like, model.trainable_parameters())
            grads = tree_map(lambda g: g * world.size, nn.average_gradients(grads, group=world.group))
            total, count = distributed.all_sum(total, world), distributed.all_sum(count, world)
            if n_stats:
                aux = distributed.all_sum(aux if aux is not None else mx.zeros((n_stats,)), world)
        step.aux = None if aux is None else [float(a) for a in aux]  # sums over this step's pairs
        denom = mx.maximum(count, 1.0)
        grads = tree_map(lambda g: g / denom, grads)
        loss = total / denom
        grads, norm = optim.clip_grad_norm(grads, max_grad_norm or float("inf"))
        mx.eval(loss, norm)
        loss_f, norm_f = float(loss), float(norm)
        if not (math.isfinite(loss_f) and math.isfinite(norm_f)):
            return loss_f, int(count), norm_f, False
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state)
        return loss_f, int(count), norm_f, True

    step.aux = None
    return step


def non_finite(step: int, loss: float, norm: float, last_good: str | None = None) -> NonFiniteError:
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
    where = f"; the last good checkpoint is {last_good}" if last_good else ""
    return NonFiniteError(f"training stopped at step {step}: the {what}; the weights were not updated{where}",
                          hint="lower train.lr, or train in float32/bfloat16 (not float16)")


def fit(model, batches: Iterable, optimizer, *, max_grad_norm: float | None = None,
        on_step: Callable[[StepReport], None] | None = None, compile: bool = True,
        chunk: int | None = losses.DEFAULT_CHUNK) -> FitResult:
    """Train on every batch of `batches` once (one optimizer step each). For tests and scripts."""
    model.train()
    step = make_step(model, optimizer, max_grad_norm, compile=compile, chunk=chunk)
    result = FitResult()
    for i, batch in enumerate(batches, 1):
        loss, count, norm, ok = step([batch])
        if not ok:
            raise non_finite(i, loss, norm)
        result.losses.append(loss)
        result.tokens += count
        if on_step:
            on_step(StepReport(i, loss, count, norm))
    model.eval()
    return result
