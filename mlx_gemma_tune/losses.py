"""Losses. A training step's loss is the masked next-token cross-entropy.

Gemma's 262,144-token vocabulary makes the logits the largest tensor of a LoRA step on small
models (2,048 tokens: 2 GiB of float32 logits, plus their gradient). `chunk` applies the LM head
(and the final soft-cap) to a slice of positions at a time under mx.checkpoint; the result is the
plain loss and gradient, exactly (tests/test_losses.py). It is OFF by default: measured with
benchmarks/loss_memory.py on Gemma 3 270M (CPU, batch 4 x 1024) it cut peak memory by only 5%
(20.3 -> 19.3 GiB), so MLX still holds most of the logits; making the saving real is issue 9.
"""

from __future__ import annotations

DEFAULT_CHUNK = None  # positions per slice of logits; None = the plain loss (see the module note)


def split_head(model):
    """(hidden_fn, head_fn) for a Gemma model: inputs -> final hidden states -> logits."""
    import mlx.core as mx

    lm = model
    if hasattr(lm, "language_model") and not hasattr(lm, "lm_head") and hasattr(lm.language_model, "model"):
        lm = lm.language_model  # gemma4 / gemma3 wrappers around the text model
    inner = getattr(getattr(lm, "model", None), "language_model", None)
    if inner is not None and hasattr(inner, "hidden"):  # gemma3n, through our fixed class
        return inner.hidden, inner.head
    if not hasattr(lm, "model"):
        return None
    cap = getattr(lm, "final_logit_softcapping", None)

    def head(h):
        out = lm.model.embed_tokens.as_linear(h) if getattr(lm, "tie_word_embeddings", True) else lm.lm_head(h)
        if cap is not None:
            out = mx.tanh(out / cap) * cap
        return out

    return (lambda inputs: lm.model(inputs)), head


def masked_cross_entropy(model, inputs, targets, mask, chunk: int | None = DEFAULT_CHUNK):
    """(sum of token losses, number of target tokens) over the masked positions, in float32.

    chunk: positions per slice of logits (None or 0: all at once, the plain loss).
    """
    import mlx.core as mx
    import mlx.nn as nn

    parts = split_head(model) if chunk else None
    if parts is None or inputs.shape[1] <= chunk:
        logits = model(inputs).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, targets, reduction="none")
        return mx.where(mask > 0, ce, 0.0).sum(), mask.sum()
    hidden_fn, head_fn = parts
    hidden = hidden_fn(inputs)

    def slice_loss(t, m):
        def f(h):
            ce = nn.losses.cross_entropy(head_fn(h).astype(mx.float32), t, reduction="none")
            return mx.where(m > 0, ce, 0.0).sum()

        return mx.checkpoint(f)  # the slice's logits are rebuilt in the backward pass, not kept

    total = mx.array(0.0)
    for start in range(0, inputs.shape[1], chunk):
        end = start + chunk
        total = total + slice_loss(targets[:, start:end], mask[:, start:end])(hidden[:, start:end])
    return total, mask.sum()


def mean_loss(model, inputs, targets, mask, chunk: int | None = DEFAULT_CHUNK):
    """Mean token loss of a batch: what a training step minimises."""
    import mlx.core as mx

    total, count = masked_cross_entropy(model, inputs, targets, mask, chunk)
    return total / mx.maximum(count, 1.0)
