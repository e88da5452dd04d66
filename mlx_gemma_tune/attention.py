"""Training-time attention for Gemma: exact, in blocks of queries that skip the keys their mask hides.

A cache-free forward pass (training, scoring, perplexity) of mlx-lm's Gemma models computes every
query against every key and then masks: on a 2,048-token row, 4x the work a 512-token sliding window
needs and 2x what causality needs, and the backward pass keeps the whole (heads, L, L) score matrix
per layer. Here the queries go in blocks of BLOCK; each block meets only the keys its mask can allow
(causal: those up to the block's end; sliding window w: the last w - 1 before its start too), which
gives the same result as the full masked softmax (a hidden key's weight is exactly 0 there), with
~0.33x of the scores on Gemma 3's sliding layers and ~0.56x on its global ones at 2,048 tokens.

How it reaches mlx-lm's unmodified models (models.apply_fixes -> install): the Gemma modules'
`create_attention_mask` returns a BandMask for a cache-free forward (no cache, or our pass-through
training caches, packing.PackedKV included, whose row ids it carries), and their
`scaled_dot_product_attention` computes a BandMask in blocks. Every other call (generation with a KV
cache, a mask array) goes to mlx-lm's functions unchanged. Gradients come from MLX's autodiff of the
blocked graph, which keeps one probability array per block: the softmax's normalisation is applied to
the (queries, head_dim) output rather than to the probabilities.

The softmax's exponential is fastmath.exp (the faster form on MLX's CPU backend).
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK = 256  # queries per block


class PassThroughKV:
    """A training stand-in for a KV cache: keeps the K/V of one forward pass.

    It has no `make_mask`, `offset` 0 and no quantization, so masks and attention are
    exactly those of a cache-free forward; its only job is to give KV-shared layers
    the keys and values their source layer computed in this pass.
    """

    offset = 0

    def update_and_fetch(self, keys, values):
        self._kv = (keys, values)
        return keys, values

    def keys_and_values(self):
        return self._kv


@dataclass(frozen=True, eq=False)
class BandMask:
    """The mask of a cache-free forward pass, described instead of materialised.

    window: a sliding window of this many keys (the query's own included), as mlx-lm's
    create_causal_mask(window_size=...); None: causal. segments: (B, L) int row ids of packed rows
    (packing.PackedKV): attention stays inside a row; None: one row per sequence.
    """

    window: int | None = None
    segments: object | None = None


def keys_per_query(n: int, window: int | None, block: int | None = None) -> float:
    """The keys a query meets on average in blocked_attention over n positions (n when n <= block and
    no window cuts it; what the backward pass keeps per query and head is this many probabilities)."""
    block, total = block or BLOCK, 0
    for q0 in range(0, n, block):
        q1 = min(q0 + block, n)
        k0 = 0 if window is None else max(0, q0 - window + 1)
        total += (q1 - q0) * (q1 - k0)
    return total / max(n, 1)


def make_mask(h, cache=None, window_size: int | None = None, return_array: bool = False):
    """mlx-lm's create_attention_mask, but a BandMask for a cache-free forward pass of h (B, L, D):
    no cache, or a pass-through training cache (models.PassThroughKV, packing.PackedKV)."""
    from mlx_lm.models import base

    if return_array or h.shape[1] < 2 or not (cache is None or isinstance(cache, PassThroughKV)):
        return base.create_attention_mask(h, cache, window_size=window_size, return_array=return_array)
    return BandMask(window=window_size, segments=getattr(cache, "segments", None))


def sdpa(queries, keys, values, cache, scale: float, mask, sinks=None):
    """mlx-lm's scaled_dot_product_attention; a BandMask is computed by blocked_attention."""
    from mlx_lm.models import base

    if isinstance(mask, BandMask) and sinks is None and queries.shape[2] == keys.shape[2]:
        return blocked_attention(queries, keys, values, scale, mask)
    if isinstance(mask, BandMask):  # a shape this file does not block: the mask as an array
        mask = _dense(mask, queries.shape[2], keys.shape[2])
    return base.scaled_dot_product_attention(queries, keys, values, cache=cache, scale=scale, mask=mask,
                                             sinks=sinks)


def _allowed(q0: int, q1: int, k0: int, k1: int, window: int | None):
    """(q1 - q0, k1 - k0) bool numpy array: key position j visible from query position i."""
    import numpy as np

    i = np.arange(q0, q1)[:, None]
    j = np.arange(k0, k1)[None, :]
    ok = j <= i
    return ok & (i - j < window) if window else ok


def _dense(mask: BandMask, n_q: int, n_k: int):
    import mlx.core as mx

    ok = mx.array(_allowed(n_k - n_q, n_k, 0, n_k, mask.window))
    if mask.segments is not None:
        seg = mask.segments
        ok = ok & (seg[:, None, -n_q:, None] == seg[:, None, None, :])
    return ok


def blocked_attention(q, k, v, scale: float, mask: BandMask, block: int | None = None):
    """softmax(q k^T * scale + mask) v, computed BLOCK queries at a time over the keys the mask allows.

    q: (B, H, L, D); k, v: (B, H_kv, L, D) with H a multiple of H_kv (grouped-query attention:
    the keys are broadcast, not repeated); returns (B, H, L, D) in q's dtype. The scores and the
    softmax are float32-accumulated as MLX's own attention fallback does (matmul in the inputs'
    dtype, softmax in float32). Equal to the dense masked computation within float rounding
    (tests/test_attention.py); differentiable by MLX's autodiff. block: queries per block (BLOCK).
    """
    import mlx.core as mx

    from mlx_gemma_tune import fastmath

    block = block or BLOCK
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    q5 = q.reshape(b, h_kv, h // h_kv, n, d)
    k5, v5 = k[:, :, None], v[:, :, None]
    outs = []
    for q0 in range(0, n, block):
        q1 = min(q0 + block, n)
        k0 = 0 if mask.window is None else max(0, q0 - mask.window + 1)
        scores = (q5[:, :, :, q0:q1] * scale) @ k5[:, :, :, k0:q1].swapaxes(-1, -2)
        scores = scores.astype(mx.float32)
        ok = _allowed(q0, q1, k0, q1, mask.window)
        allowed = None if ok.all() else mx.array(ok)
        if mask.segments is not None:
            seg = mask.segments
            same = seg[:, None, None, q0:q1, None] == seg[:, None, None, None, k0:q1]
            allowed = same if allowed is None else allowed & same
        if allowed is not None:
            scores = mx.where(allowed, scores, -mx.inf)
        top = mx.stop_gradient(scores.max(axis=-1, keepdims=True))  # softmax is shift-invariant
        p = fastmath.exp(scores - top)
        out = (p.astype(v.dtype) @ v5[:, :, :, k0:q1]) / p.sum(axis=-1, keepdims=True).astype(v.dtype)
        outs.append(out)
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=3)
    return out.reshape(b, h, n, d).astype(q.dtype)


MODULES = ("mlx_lm.models.gemma3_text", "mlx_lm.models.gemma3n", "mlx_lm.models.gemma4_text")


def install() -> None:
    """Point the Gemma modules of mlx-lm at make_mask and sdpa (idempotent; see the module docstring)."""
    import importlib

    for name in MODULES:
        module = importlib.import_module(name)
        module.create_attention_mask = make_mask
        module.scaled_dot_product_attention = sdpa
