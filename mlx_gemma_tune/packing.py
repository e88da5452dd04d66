"""Sequence packing: several short rows in one training sequence, none seeing another.

A packed sequence is its rows' tokens back to back. Attention is causal *within* a row only
(a block-diagonal mask, and the sliding window inside it), and a row's first token is never a
target, so every row's loss is the loss it has alone (tests/test_packing.py).

Positions: mx.fast.rope takes one offset per sequence, not per token, so positions run on
through a packed sequence instead of restarting. Every Gemma attention layer uses RoPE, whose
query-key product depends only on the distance between the two positions, and no attention
crosses a row, so this computes the same function (to fp32 rounding of the angles).

The mask reaches mlx-lm's unmodified Gemma models the way a KV cache's does: through
`cache.make_mask`, from a pass-through cache object that keeps no state between calls.
"""

from __future__ import annotations

from mlx_gemma_tune.attention import PassThroughKV


class PackedKV(PassThroughKV):
    """A pass-through KV 'cache' whose mask keeps attention inside each packed row."""

    def __init__(self, segments):
        self.segments = segments  # (B, L) int: the row id of each input position; -1 = padding

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        from mlx_lm.models.base import create_causal_mask

        causal = create_causal_mask(n, window_size=window_size)
        seg = self.segments
        return causal & (seg[:, None, :, None] == seg[:, None, None, :])


def attention_cache(model, segments) -> list:
    """The per-layer cache list that makes a Gemma model attend within packed rows only."""
    count = len(model.make_cache()) if hasattr(model, "make_cache") else len(model.layers)
    return [PackedKV(segments) for _ in range(count)]


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows (by index) grouped into sequences of at most `capacity` tokens: first-fit decreasing.

    Deterministic in the lengths alone, so the packing is the same in every epoch and on resume
    (the order of the packed sequences is shuffled per epoch instead).
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def batch_arrays(sequences: list[list], pad_id: int = 0):
    """(inputs, targets, mask, segments) mlx arrays for a micro-batch of sequences of examples.

    Every sequence is a list of data.Example; with one example each this is the plain padded
    batch and segments is None (plain causal attention).
    """
    import mlx.core as mx
    import numpy as np

    width = max(sum(len(e.tokens) for e in seq) for seq in sequences)
    packed = any(len(seq) > 1 for seq in sequences)
    toks = np.full((len(sequences), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(sequences), width), dtype=np.float32)
    seg = np.full((len(sequences), width), -1, dtype=np.int32)
    for r, seq in enumerate(sequences):
        at = 0
        for k, e in enumerate(seq):
            n = len(e.tokens)
            toks[r, at:at + n] = e.tokens
            mask[r, at:at + n] = e.mask
            mask[r, at] = 0.0  # a row's first token is never predicted (from the row before it)
            seg[r, at:at + n] = k
            at += n
    segments = mx.array(seg[:, :-1]) if packed else None
    return mx.array(toks[:, :-1]), mx.array(toks[:, 1:]), mx.array(mask[:, 1:]), segments
