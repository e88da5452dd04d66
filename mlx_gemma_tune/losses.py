"""Losses. A training step's loss is the masked next-token cross-entropy.

Gemma's 262,144-token vocabulary makes the logits the largest tensor of a LoRA step on small
models (2,048 tokens: 2 GiB of float32 logits, plus their gradient). The default loss never
holds them: it gathers the hidden states of the target tokens only (prompt and padding
positions need no logits), and applies the LM head, the final soft-cap and the cross-entropy
to `chunk` of them at a time, in a custom function that computes each slice's gradient while
its logits exist (the backward pass only scales it). Slices are chained with `mx.depends` so
MLX's scheduler (which evaluates up to 20 independent branches side by side) cannot run them
concurrently; that is why an earlier mx.checkpoint version saved only 5%. The value and the
gradients equal the plain loss to fp32 rounding (tests/test_losses.py).

The head must be frozen (it is: LoRA never targets the embedding / LM head); its gradient is
not computed here.
"""

from __future__ import annotations

DEFAULT_CHUNK = 192  # target tokens per slice of logits (192 x 262,144 x 4 B = 192 MiB per copy)
SMALL_PAD = 64  # the target count is padded to a multiple of this (the last slice is the remainder)


def split_head(model):
    """(hidden_fn(inputs, cache=None), linear_fn, cap) for a Gemma model, or None.

    inputs -> hidden_fn -> final hidden states; linear_fn(h) -> raw logits (tied embedding or LM
    head); Gemma's final soft-cap (None when the model has none) turns them into the model's
    logits: tanh(raw / cap) * cap (see head_logits).
    """
    lm = model
    if hasattr(lm, "language_model") and not hasattr(lm, "lm_head") and hasattr(lm.language_model, "model"):
        lm = lm.language_model  # gemma4 / gemma3 wrappers around the text model
    inner = getattr(getattr(lm, "model", None), "language_model", None)
    if inner is not None and hasattr(inner, "hidden"):  # gemma3n, through our fixed class
        return ((lambda inputs, cache=None: inner.hidden(inputs, cache)), inner.embed_tokens.as_linear,
                inner.final_logit_softcapping)
    if not hasattr(lm, "model"):
        return None
    linear = lm.model.embed_tokens.as_linear if getattr(lm, "tie_word_embeddings", True) else lm.lm_head
    return (lambda inputs, cache=None: lm.model(inputs, cache=cache)), linear, getattr(lm, "final_logit_softcapping",
                                                                                       None)


def head_logits(linear, cap, h):
    """The model's float32 logits for final hidden states h."""
    import mlx.core as mx

    from mlx_gemma_tune import fastmath

    out = linear(h).astype(mx.float32)
    return out if cap is None else fastmath.tanh(out / cap) * cap


def padded_count(targets: int, chunk: int) -> int:
    """How many target rows the chunked loss computes for `targets` targets (see select_targets): the
    next multiple of SMALL_PAD (slices of `chunk`, the last one shorter), at least SMALL_PAD."""
    return max(SMALL_PAD, -(-targets // SMALL_PAD) * SMALL_PAD)


def select_targets(mask, chunk: int = DEFAULT_CHUNK):
    """(flat indices, weights) of the target positions of a mask, padded with weight-0 entries.

    Computed on the host from the (already materialised) mask; the count is padded to a
    multiple of SMALL_PAD so compiled steps see few shapes (padding to whole chunks cost up to a
    chunk of wasted logits: 12% of the loss on a 2,048-token row with 869 targets).
    """
    import mlx.core as mx
    import numpy as np

    m = np.asarray(mask, dtype=np.float32).reshape(-1)
    idx = np.flatnonzero(m > 0).astype(np.int32)
    size = padded_count(len(idx), chunk)
    weights = np.zeros(size, dtype=np.float32)
    weights[: len(idx)] = m[idx]
    return mx.array(np.pad(idx, (0, size - len(idx)))), mx.array(weights)


def _logsumexp_and_exp(z):
    """(logsumexp(z) (M,), exp(z - max) (M, V), sum of the latter (M, 1)) of float32 logits z (M, V):
    the one exponential the loss and its gradient share (fastmath.exp)."""
    import mlx.core as mx

    from mlx_gemma_tune import fastmath

    top = z.max(axis=-1, keepdims=True)
    e = fastmath.exp(z - top)
    total = e.sum(axis=-1, keepdims=True)
    return (top + mx.log(total))[:, 0], e, total


def _token_ce(z, t):
    """Each row's cross-entropy (float32 logits z (M, V), targets t (M,))."""
    import mlx.core as mx

    return _logsumexp_and_exp(z)[0] - mx.take_along_axis(z, t[:, None], axis=-1)[:, 0]


def _head_rows(linear):
    """t (M,) -> the head's weight rows W[t] (M, D), for a tied embedding head (Gemma's): the embedding
    itself gathers them (dequantized for a quantized one). None for another head."""
    import mlx.nn as nn

    module = getattr(linear, "__self__", None)
    if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)) and getattr(linear, "__name__", "") == "as_linear":
        return module
    return None


def _slice_ce_and_grad(linear, cap, h, t):
    """(ce (M,), d ce_i / d h_i (M, D)) of one slice, the gradient written out while its logits exist.

    d ce / d logits = (softmax - one_hot) * s, s = 1 - (logits / cap)^2 (1 without a soft-cap), so
    d ce / d h = ((e * s) @ W) / sum(e) - s_t * W[t] with e = exp(logits - max): one product with the head
    (mx.vjp of the linear map) and a gather of the targets' rows, and no normalised or one-hot-edited copy
    of the (M, V) logits (2 live instead of 4: the loss's peak memory). Heads other than a tied embedding
    take the softmax path."""
    import mlx.core as mx

    z = head_logits(linear, cap, h)
    lse, e, total = _logsumexp_and_exp(z)
    zt = mx.take_along_axis(z, t[:, None], axis=-1)[:, 0]
    rows = _head_rows(linear)
    if rows is None:
        d = e / total  # softmax
        d = mx.put_along_axis(d, t[:, None], mx.take_along_axis(d, t[:, None], axis=-1) - 1.0, axis=-1)
        if cap is not None:
            d = d * (1.0 - mx.square(z / cap))
        _, (dh,) = mx.vjp(linear, [h], [d.astype(h.dtype)])
        return lse - zt, dh
    g, st = (e, mx.ones_like(zt)) if cap is None else (e * (1.0 - mx.square(z / cap)), 1.0 - mx.square(zt / cap))
    _, (dh,) = mx.vjp(linear, [h], [g.astype(h.dtype)])
    dh = dh / total.astype(dh.dtype) - st[:, None].astype(dh.dtype) * rows(t).astype(dh.dtype)
    return lse - zt, dh


def _chunked_head_loss(linear, cap, chunk: int, grad: bool):
    """(h (M, D), targets (M,), weights (M,)) -> sum of weighted token losses, one slice at a time.

    With grad=True it is a custom function that also computes each slice's gradient with
    respect to h in the forward pass (while that slice's logits exist) and hands it to the
    backward pass: the logits are built once, never kept, and the backward costs nothing.
    The slice's gradient is written out rather than autodiffed through the cross-entropy:
    d loss / d logits = w * (softmax - one_hot) * (1 - (logits / cap)^2), then one product with
    the head's weights (mx.vjp of the linear map alone). That holds ~3 logit-sized arrays at
    its peak where autodiff of nn.losses.cross_entropy held ~9.
    """
    import mlx.core as mx

    def piece(h, t, w):
        return (_token_ce(head_logits(linear, cap, h), t) * w).sum()

    def piece_with_grad(h, t, w):
        ce, dh = _slice_ce_and_grad(linear, cap, h, t)
        return (ce * w).sum(), dh * w[:, None].astype(dh.dtype)  # scaling rows of d = scaling rows of dh

    def slices(n):
        return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]

    def forward(h, t, w):
        total, grads, prev = mx.array(0.0), [], None
        for s, e in slices(h.shape[0]):
            hs = h[s:e] if prev is None else mx.depends(h[s:e], prev)  # one slice of logits at a time
            if grad:
                value, g = piece_with_grad(hs, t[s:e], w[s:e])
                grads.append(g)
                prev = [value, g]  # both: a pending value would keep this slice's logits alive
            else:
                value = prev = piece(hs, t[s:e], w[s:e])
            total = total + value
        return total, grads

    if not grad:
        return lambda h, t, w: forward(h, t, w)[0]

    @mx.custom_function
    def loss(h, t, w):
        total, grads = forward(h, t, w)
        return total, mx.concatenate(grads, axis=0).astype(h.dtype)

    @loss.vjp
    def loss_vjp(primals, cotangents, outputs):
        _, t, w = primals
        return cotangents[0] * outputs[1], mx.zeros_like(t), mx.zeros_like(w)

    return lambda h, t, w: loss(h, t, w)[0]


def token_losses(linear, cap, chunk: int = DEFAULT_CHUNK, grad: bool = True):
    """(h (M, D), targets (M,)) -> each target token's cross-entropy (M,) float32, one slice of `chunk`
    logits at a time; differentiable with respect to h for any cotangent (M,). grad=False (scoring
    only: reference log-probabilities, evaluation) skips the per-slice gradients and costs half.

    Like _chunked_head_loss, each slice's gradient d ce_i / d h_i is made in the forward pass while
    its logits exist and kept (M x D, the size of h); the backward pass scales row i by the
    cotangent of ce_i. Preference losses (preference.py) weight rows by values known only after the
    forward pass, which a fixed-weight sum cannot express."""
    import mlx.core as mx

    def forward_only(h, t):
        values, prev = [], None
        for s in range(0, h.shape[0], chunk):
            hs = h[s:s + chunk] if prev is None else mx.depends(h[s:s + chunk], prev)
            prev = _token_ce(head_logits(linear, cap, hs), t[s:s + chunk])
            values.append(prev)
        return mx.concatenate(values)

    if not grad:
        return forward_only

    @mx.custom_function
    def per_token(h, t):
        values, grads, prev = [], [], None
        for s in range(0, h.shape[0], chunk):
            hs = h[s:s + chunk] if prev is None else mx.depends(h[s:s + chunk], prev)  # one slice at a time
            ce, dh = _slice_ce_and_grad(linear, cap, hs, t[s:s + chunk])
            values.append(ce)
            grads.append(dh)
            prev = [ce, dh]
        return mx.concatenate(values), mx.concatenate(grads, axis=0).astype(h.dtype)

    @per_token.vjp
    def per_token_vjp(primals, cotangents, outputs):
        _, t = primals
        return cotangents[0][:, None].astype(outputs[1].dtype) * outputs[1], mx.zeros_like(t)

    return lambda h, t: per_token(h, t)[0]


def masked_cross_entropy(model, inputs, targets, mask, segments=None, chunk: int | None = DEFAULT_CHUNK,
                         selected=None, grad: bool = False, extra: dict | None = None):
    """(sum of token losses, number of target tokens) over the masked positions, in float32.

    segments: packed rows' ids (see packing.py), or None. chunk: target tokens per slice of
    logits; None or 0 computes the plain loss over full logits. selected: select_targets(mask)
    when the caller has it (a compiled step must pass it: the mask is not readable inside).
    grad: the caller differentiates this loss (a training step); any value is correct, True makes
    the chunked loss's backward pass cheap and False its forward pass. extra: an image / audio row's
    model inputs (pixel_values, ...) for an mlx-vlm Gemma 4 (multimodal.head).
    """
    import mlx.core as mx
    import mlx.nn as nn

    cache = None
    if segments is not None:
        from mlx_gemma_tune import packing

        cache = packing.attention_cache(model, segments)
    if not chunk:
        parts = None
    elif extra:  # an image / audio row of an mlx-vlm Gemma 4
        from mlx_gemma_tune import multimodal

        parts = multimodal.head(model, extra)
    else:
        parts = split_head(model)
    if parts is None:
        out = model(inputs, cache=cache, **extra) if extra else model(inputs, cache=cache)
        logits = getattr(out, "logits", out).astype(mx.float32)  # mlx-vlm returns an output object
        ce = nn.losses.cross_entropy(logits, targets, reduction="none")
        return mx.where(mask > 0, ce * mask, 0.0).sum(), mask.sum()
    hidden_fn, linear, cap = parts
    hidden = hidden_fn(inputs, cache)
    idx, weights = selected if selected is not None else select_targets(mask, chunk)
    h = hidden.reshape(-1, hidden.shape[-1])[idx]
    total = _chunked_head_loss(linear, cap, chunk, grad)(h, targets.reshape(-1)[idx], weights)
    return total, mask.sum()


def mean_loss(model, inputs, targets, mask, chunk: int | None = DEFAULT_CHUNK, segments=None, grad: bool = True):
    """Mean token loss of a batch: what a training step minimises."""
    import mlx.core as mx

    total, count = masked_cross_entropy(model, inputs, targets, mask, segments, chunk, grad=grad)
    return total / mx.maximum(count, 1.0)
