"""Gradient checkpointing: decoder layers that recompute their activations in the backward pass.

A checkpointed layer keeps only its inputs for the backward pass and runs its forward again there
(mx.checkpoint): its activations (~30 hidden-widths per token for Gemma, plus attention scores) are
not held across the step, for one more forward pass of that layer. `checkpoint_layers` does it for
all of a model's layers or for the first n of them (selective recomputation); `resolve`
chooses n from memory.py's estimate and the machine's budget (train.grad_checkpoint: auto).
"""

from __future__ import annotations

import functools


def _split_arrays(obj):
    """(arrays in obj, rebuild(arrays) -> obj) for an array, a tuple/list of arrays, or anything else."""
    import mlx.core as mx

    if isinstance(obj, mx.array):
        return [obj], lambda xs: xs[0]
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(v, mx.array) for v in obj):
        return list(obj), lambda xs: type(obj)(xs)
    return [], lambda xs: obj


@functools.cache
def _keyed_dropout_class():
    import mlx.core as mx
    import mlx.nn as nn

    class KeyedDropout(nn.Dropout):
        """nn.Dropout drawing its mask from a key set per call, so a recomputation repeats it."""

        _mgt_key = None  # a plain attribute (object.__setattr__), not a parameter

        def __call__(self, x):
            if self._p_1 == 1 or not self.training:
                return x
            mask = mx.random.bernoulli(self._p_1, x.shape, key=self._mgt_key)
            return (mask * x) * (1 / self._p_1)

    return KeyedDropout


@functools.cache
def _checkpointed_class(cls):
    import mlx.core as mx
    import mlx.nn as nn

    class Checkpointed(cls):
        """The layer, recomputed in the backward pass instead of keeping its activations.

        Arrays among the arguments (including tuples of arrays, e.g. Gemma 4's shared K/V)
        are checkpoint inputs, so gradients flow through them; the layer's dropouts draw from a
        key captured as a constant, so the recomputation repeats the forward pass's masks.
        """

        _mgt_checkpointed = True

        def __call__(self, *args, **kwargs):
            names = list(kwargs)
            parts = [_split_arrays(a) for a in args] + [_split_arrays(kwargs[k]) for k in names]
            sizes = [len(arrays) for arrays, _ in parts]
            dropouts = [m for _, m in self.named_modules() if isinstance(m, nn.Dropout)]
            key = mx.stop_gradient(mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32))  # global state
            rebuild_out = []

            def inner(params, *flat):  # the key is captured: a constant, the same in the recomputation
                self.update(params)
                values, at = [], 0
                for (_, rebuild), n in zip(parts, sizes):
                    values.append(rebuild(list(flat[at:at + n])))
                    at += n
                for d, k in zip(dropouts, mx.random.split(key, max(len(dropouts), 2))):
                    d.__class__ = _keyed_dropout_class()
                    object.__setattr__(d, "_mgt_key", k)
                out = cls.__call__(self, *values[:len(args)], **dict(zip(names, values[len(args):])))
                items = list(out) if isinstance(out, tuple) else [out]
                split = [_split_arrays(o) for o in items]
                rebuild_out[:] = [(len(a), r) for a, r in split] + [isinstance(out, tuple)]
                return [a for arrays, _ in split for a in arrays]

            flat_in = [a for arrays, _ in parts for a in arrays]
            flat_out = mx.checkpoint(inner)(self.trainable_parameters(), *flat_in)
            *pieces, is_tuple = rebuild_out
            outs, at = [], 0
            for n, rebuild in pieces:
                outs.append(rebuild(flat_out[at:at + n]))
                at += n
            return tuple(outs) if is_tuple else outs[0]

    Checkpointed.__name__ = Checkpointed.__qualname__ = f"Checkpointed{cls.__name__}"
    return Checkpointed


def eligible_layers(model) -> list[int]:
    """Indices of the decoder layers that can be checkpointed.

    Gemma 3n's KV-sharing layers pass K/V through cache objects (a side channel mx.checkpoint
    cannot differentiate through), so its KV-source and KV-shared layers are left out.
    """
    layers = model.layers
    inner = getattr(getattr(model, "model", None), "language_model", None)
    skip: set[int] = set()
    if inner is not None and hasattr(inner, "layer_idx_to_cache_idx"):
        first = inner.first_kv_shared_layer_idx
        skip = set(range(first, len(layers))) | {inner.layer_idx_to_cache_idx[i] for i in range(first, len(layers))}
    return [i for i in range(len(layers)) if i not in skip]


def first(count: int, eligible: list[int]) -> list[int]:
    """The first `count` eligible layer indices (all of them when count >= their number).

    The first layers, not every k-th: the backward pass reaches them last, when the later layers'
    activations are already freed, so recomputing one never adds to the step's peak (the peak stays
    at the end of the forward pass, where the loss runs), and each further layer lowers it.
    """
    return eligible[:max(0, count)]


def resolve(setting, eligible: int, at):
    """The estimate for a train.grad_checkpoint setting, given at(n) -> memory.Estimate with n layers
    checkpointed (True: all, False: none). auto (or None): the fewest n in 0..eligible whose estimate
    fits the budget (it falls as n grows, so the first that fits is the fewest), all when none does;
    any other setting: at(setting)."""
    if setting not in (None, "auto"):
        return at(setting)
    for n in range(eligible + 1):
        est = at(n)
        if not est.over_budget:
            break
    return est


def checkpoint_layers(model, count: int | None = None) -> int:
    """Make `count` decoder layers (None: all that can be) recompute their activations in the backward
    pass, the first eligible ones (eligible_layers, first); returns how many are checkpointed."""
    layers = model.layers
    eligible = eligible_layers(model)
    chosen = first(len(eligible) if count is None else count, eligible)
    for i in chosen:
        layer = layers[i]
        if not getattr(type(layer), "_mgt_checkpointed", False):
            layer.__class__ = _checkpointed_class(type(layer))
    return len(chosen)
