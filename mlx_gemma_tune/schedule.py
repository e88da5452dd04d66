"""The learning-rate schedule and the data order of a run: pure functions of the recipe and the seed.

The order of every epoch is a function of (seed, epoch) alone, so a resumed run (or a distributed
one, where every rank computes the same global batches) sees exactly the batches of one that
never stopped.
"""

from __future__ import annotations


def plan(lengths: list[int], recipe) -> tuple[list[list[int]] | None, int, int, int]:
    """(packed bins or None, micro-batches per epoch, steps per epoch, total steps) of a run on rows of
    these token lengths: train.iters, else train.epochs passes rounded up to whole steps."""
    import math

    from mlx_gemma_tune import packing

    cfg = recipe.train
    bins = packing.pack(lengths, recipe.data.max_seq_length) if recipe.data.pack else None
    n_batches = len(epoch_batches(lengths, cfg.batch_size, cfg.seed, 0, bins))
    steps_per_epoch = max(1, math.ceil(n_batches / cfg.grad_accumulation))
    return bins, n_batches, steps_per_epoch, cfg.iters or max(1, math.ceil(cfg.epochs * steps_per_epoch))


def lr_schedule(lr: float, kind: str, warmup: int, total: int):
    """Linear warm-up (the first step already moves) then cosine / linear decay to 0, or constant."""
    import mlx.optimizers as optim

    decay_steps = max(total - warmup, 1)
    if kind == "cosine":
        decay = optim.cosine_decay(lr, decay_steps, 0.0)
    elif kind == "linear":
        decay = optim.linear_schedule(lr, 0.0, decay_steps)
    else:  # constant; a schedule must return an array (the optimizer casts it)
        decay = optim.linear_schedule(lr, lr, 1)
    if warmup < 2:
        return decay
    return optim.join_schedules([optim.linear_schedule(lr / warmup, lr, warmup - 1), decay], [warmup])


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  bins: list[list[int]] | None = None) -> list[list[list[int]]]:
    """An epoch's micro-batches, each a list of sequences, each a list of row indices.

    Unpacked: length-grouped batches of single rows (little padding). Packed: `bins` (see
    packing.pack) in a shuffled order, batch_size sequences per batch. Order fixed by (seed, epoch).
    """
    import numpy as np

    rng = np.random.default_rng([seed, epoch])
    if bins is not None:
        seqs = [bins[i] for i in rng.permutation(len(bins))]
        return [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)]
    tie = rng.random(len(lengths))
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], tie[i]))
    groups = [[[i] for i in order[i:i + batch_size]] for i in range(0, len(order), batch_size)]
    return [groups[i] for i in rng.permutation(len(groups))]
