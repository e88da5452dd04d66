"""Loading Gemma models with mlx-lm, plus the small fixes that make training exact.

mlx-lm's Gemma models are right for generation (which runs through a KV cache) but
not always for training (no cache). The fixes below are registered per model_type
and applied to every model this tool loads; each is pinned by a test that fails if
mlx-lm changes the code underneath (tests/test_exactness.py).

Gemma 3n (`gemma3n`, and `gemma3n_text` which mlx-lm does not know):
  * KV sharing without a cache (mlx-lm issue #1674). The last `num_kv_shared_layers`
    layers must attend with the K/V of an earlier layer. mlx-lm reads those from the
    cache, so with no cache (every training step) the shared layers compute their own
    K/V from weights that are unused at inference. Fix: when no cache is given, hand
    each non-shared layer a pass-through "cache" that keeps this forward's K/V for the
    layers sharing it. Same masks, same positions, so it equals the cached forward.
  * AltUp magnitude normalisation divides by sqrt(mean(x^2)) clamped at the most
    negative float, i.e. not at all: a zero embedding row (the padding row of the real
    checkpoints) gives 0/0 = NaN, silently. Fix: clamp mean(x^2) at 1e-5 as
    transformers does.
  * Activation sparsity (Gaussian top-k) takes std() of the gate activations; an
    all-zero row (a run of zero <pad> embeddings longer than the sliding window) has
    std 0, whose gradient is inf * 0 = NaN. Fix: std = sqrt(max(var, 1e-12)), equal
    to the original wherever the variance is not vanishing.

Gemma 3 (`gemma3_text`, and the text model inside `gemma3`):
  * The embeddings are scaled by sqrt(hidden_size) rounded to bfloat16 whatever the model's
    dtype (25.25 instead of 25.298 for the 270M's hidden 640); transformers rounds the scale
    to the weights' dtype (Gemma3TextScaledWordEmbedding), so float32 models disagreed by up
    to 0.29 in logits. Fix: the scale in the embeddings' dtype. (Exact in bfloat16 already,
    and at the fixtures' hidden 64, whose square root is 8.)

Fast paths (every Gemma family, _fast_paths): a cache-free forward attends in blocks over the keys
its mask allows (attention.py), and the MLPs compute gelu(gate) * up as fastmath.geglu (the same
function, one activation array less kept for the backward pass). Same numbers to float32 rounding
(tests/test_attention.py, and the exactness tests above run through them).
"""

from __future__ import annotations

import functools
from pathlib import Path

from mlx_gemma_tune.attention import PassThroughKV

# sha256 of inspect.getsource() of each mlx-lm function we override, for the version we
# verified. tests/test_exactness.py fails when mlx-lm's code changes, so the override is
# re-checked (and dropped, once upstream is fixed) instead of silently going stale.
OVERRIDDEN_SOURCE_SHA256 = {
    "mlx_lm.models.gemma3n.LanguageModel.__call__": "5db8a11a0416d7554bd66b22118aa354a0b449b3767333e25e76fdf1772991f0",
    "mlx_lm.models.gemma3n.MLP.__call__": "ddd94c5780f459cc756baa25d6ad311c54834630927f3481c0aa69bcfb65f8ee",
    "mlx_lm.models.gemma3n.gelu_topk": "eb6974558c7fbe0f2dddd4c46d6d87524127efa67414090e55f1c55221d94b8d",
    "mlx_lm.models.gemma3_text.Gemma3Model.__call__": "e65de4285bbd483539024393fa63f30974a7a05b1f551a53ff5b4196c9889653",
    "mlx_lm.models.gemma3_text.MLP.__call__": "af866537bc38d7c4f06832d35fee07e60dfa5e8d5dd0825fc85bac4ab265c4b5",
    # replaced in the Gemma modules' namespaces (attention.install, _fast_paths)
    "mlx_lm.models.base.create_attention_mask": "a8ebacf963b3f96e9ad838a7a870d1ef6da33aec5233b133b0d0c744c3b33e5e",
    "mlx_lm.models.base.scaled_dot_product_attention": "8deba4a8a8fb4e29f1e69ea81701da68f08f90656e1421a1e7a82332aadc41c1",
    "mlx_lm.models.gemma4_text.geglu": "fb52a0371527ca4b13f8094ca37525509cc8e872a0b59e9cf4feab1ff162bf12",
}
# module globals of mlx-lm that _fast_paths replaced -> the originals (their sources are pinned above)
REPLACED: dict[str, object] = {}
ALTUP_EPS = 1e-5  # transformers' Gemma3nTextModel clamps mean(x^2) here
TOPK_VAR_EPS = 1e-12


@functools.cache
def _gemma3n_language_model_class():
    import mlx.core as mx
    from mlx_lm.models import gemma3n

    from mlx_gemma_tune.attention import make_mask as create_attention_mask

    def magnitude(x):
        return mx.sqrt(mx.maximum(mx.mean(x**2, axis=-1, keepdims=True), ALTUP_EPS))

    class LanguageModel(gemma3n.LanguageModel):
        """mlx-lm's Gemma 3n text model with exact KV sharing without a cache and a safe AltUp."""

        def __call__(self, inputs=None, cache=None, input_embeddings=None):
            return self.head(self.hidden(inputs, cache, input_embeddings))

        def head(self, h):
            """Final hidden states -> logits (tied embedding, soft-cap)."""
            out = self.embed_tokens.as_linear(h)
            if self.final_logit_softcapping is not None:
                out = gemma3n.logit_softcap(self.final_logit_softcapping, out)
            return out

        def hidden(self, inputs=None, cache=None, input_embeddings=None):
            """The normed final hidden states (what the LM head reads)."""
            if input_embeddings is None:
                h = self.embed_tokens(inputs) * (self.hidden_size**0.5)
            else:
                h = input_embeddings
            per_layer_inputs = self.get_per_layer_inputs(inputs)
            per_layer_inputs = self.project_per_layer_inputs(h, per_layer_inputs)

            if cache is None:  # training path: share K/V within this forward pass
                cache = [PassThroughKV() for _ in range(self.first_kv_shared_layer_idx)]

            global_mask = create_attention_mask(h, cache[self.first_full_idx])
            sliding_mask = create_attention_mask(h, cache[self.first_sliding_idx], window_size=self.sliding_window)

            h0 = h
            target = mx.mean(h0**2, axis=-1, keepdims=True) ** 0.5
            h = mx.stack([h0] + [proj(h0) for proj in self.altup_projections], axis=0)
            h[1:] = h[1:] * (target / magnitude(h[1:]))
            offset = cache[0].offset if cache[0] is not None else 0
            for i, layer in enumerate(self.layers):
                mask = global_mask if self.config.layer_types[i] == "full_attention" else sliding_mask
                h = layer(h, mask, cache[self.layer_idx_to_cache_idx[i]], per_layer_inputs[:, :, i, :], offset=offset)

            target = mx.mean(h[0] ** 2, axis=-1, keepdims=True) ** 0.5
            for i, proj in enumerate(self.altup_unembed_projections):
                h[i + 1] = proj(h[i + 1])
            h[1:] = h[1:] * (target / magnitude(h[1:]))
            return self.norm(mx.mean(h, axis=0))

    return LanguageModel


@functools.cache
def _gemma3n_mlp_class():
    import mlx.core as mx
    from mlx_lm.models import gemma3n

    from mlx_gemma_tune import fastmath

    class MLP(gemma3n.MLP):
        """mlx-lm's Gemma 3n MLP whose Gaussian top-k has a finite gradient on zero rows."""

        def __call__(self, x):
            gate = self.gate_proj(x)
            if self.activation_sparsity > 0.0:
                mean = mx.mean(gate, axis=-1, keepdims=True)
                var = mx.mean(mx.square(gate - mean), axis=-1, keepdims=True)
                std = mx.sqrt(mx.maximum(var, TOPK_VAR_EPS))
                cutoff = mean + std * self._std_multiplier.astype(std.dtype)
                return self.down_proj(fastmath.gelu_approx(mx.maximum(0, gate - cutoff)) * self.up_proj(x))
            return self.down_proj(fastmath.geglu(gate, self.up_proj(x)))

    return MLP


def _fix_gemma3n(model) -> None:
    lm = model.model.language_model
    lm.__class__ = _gemma3n_language_model_class()
    for layer in lm.layers:
        layer.mlp.__class__ = _gemma3n_mlp_class()


@functools.cache
def _gemma3_text_model_class():
    import mlx.core as mx
    from mlx_lm.models import gemma3_text

    from mlx_gemma_tune.attention import make_mask as create_attention_mask

    class Gemma3Model(gemma3_text.Gemma3Model):
        """mlx-lm's Gemma 3 text model with the embedding scale in the embeddings' dtype."""

        def __call__(self, inputs, cache=None, input_embeddings=None):
            h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
            h = h * mx.array(self.args.hidden_size**0.5, dtype=h.dtype)  # transformers: scale.to(weight.dtype)
            cache = cache if cache is not None else [None] * len(self.layers)
            pattern = self.sliding_window_pattern
            global_mask = create_attention_mask(h, cache[pattern - 1])
            sliding_mask = create_attention_mask(h, cache[0], window_size=self.window_size) if pattern > 1 else None
            for i, (layer, c) in enumerate(zip(self.layers, cache)):
                h = layer(h, global_mask if i % pattern == pattern - 1 else sliding_mask, c)
            return self.norm(h)

    return Gemma3Model


def _fix_gemma3_text(model) -> None:
    inner = model.language_model.model if hasattr(model, "language_model") else model.model
    inner.__class__ = _gemma3_text_model_class()
    for layer in inner.layers:
        layer.mlp.__class__ = _gemma3_mlp_class()


@functools.cache
def _gemma3_mlp_class():
    from mlx_lm.models import gemma3_text

    from mlx_gemma_tune import fastmath

    class MLP(gemma3_text.MLP):
        """mlx-lm's Gemma 3 MLP with fastmath.geglu (the same function: faster on MLX's CPU backend, and
        one activation array less kept per layer)."""

        def __call__(self, x):
            return self.down_proj(fastmath.geglu(self.gate_proj(x), self.up_proj(x)))

    return MLP


def _geglu(gate, x):
    """mlx-lm gemma4_text.geglu as fastmath.geglu (the same function, less memory)."""
    from mlx_gemma_tune import fastmath

    return fastmath.geglu(gate, x)


def _fast_paths(model) -> None:
    """Cache-free forwards attend in blocks over the keys their mask allows (attention.py); the MLPs'
    GELU is fastmath's (Gemma 3 through its MLP class, Gemma 4 through the module's geglu)."""
    from mlx_lm.models import gemma4_text

    from mlx_gemma_tune import attention

    attention.install()
    if gemma4_text.geglu is not _geglu:
        REPLACED.setdefault("mlx_lm.models.gemma4_text.geglu", gemma4_text.geglu)
        gemma4_text.geglu = _geglu


# model_type (as mlx-lm builds it) -> fixes applied to every loaded model of that type
FIXES = {"gemma3n": (_fix_gemma3n, _fast_paths), "gemma3_text": (_fix_gemma3_text, _fast_paths),
         "gemma3": (_fix_gemma3_text, _fast_paths), "gemma4": (_fast_paths,),
         "gemma4_text": (_fast_paths,)}


def apply_fixes(model) -> list[str]:
    """Apply the registered fixes to a loaded mlx-lm model; returns their names."""
    applied = []
    for fix in FIXES.get(getattr(model, "model_type", None), ()):
        fix(model)
        applied.append(fix.__name__)
    return applied


PLE_BITS, PLE_GROUP = 8, 64


def quantize_ple(model, bits: int = PLE_BITS, group_size: int = PLE_GROUP, evaluate: bool = True) -> int:
    """Hold the per-layer-embedding table of a Gemma 3n / Gemma 4 E model (embed_tokens_per_layer, vocab x
    layers * 256) as mlx's QuantizedEmbedding: affine `bits`-bit, the gathered rows alone dequantized
    per batch, so the table costs ~bits/16 of its bf16 size. Returns the bytes saved (0 when the
    model has no such float table, e.g. a QLoRA base whose table convert already quantized).
    evaluate=False leaves the quantized table lazy (a plan needs its shapes only)."""
    import mlx.core as mx
    import mlx.nn as nn

    saved = 0
    for path, module in list(model.named_modules()):
        if path.endswith("embed_tokens_per_layer") and type(module) is nn.Embedding \
                and module.weight.shape[-1] % group_size == 0:
            q = nn.QuantizedEmbedding.from_embedding(module, group_size=group_size, bits=bits)
            if evaluate:
                mx.eval(q.parameters())
            saved += module.weight.nbytes - sum(v.nbytes for v in (q.weight, q.scales, q.biases))
            parent = model
            *head, last = path.split(".")
            for part in head:
                parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
            setattr(parent, last, q)
    return saved


def _gemma3n_text_classes(config: dict):
    """mlx-lm's gemma3n classes for a `gemma3n_text` (Gemma3nForCausalLM) checkpoint."""
    from mlx_lm.models import gemma3n

    class Model(gemma3n.Model):
        def sanitize(self, weights):
            # Gemma3nForCausalLM stores model.X; mlx-lm's gemma3n expects model.language_model.X.
            def rename(k):
                if k.startswith("model.") and not k.startswith("model.language_model."):
                    return "model.language_model." + k[len("model."):]
                return k

            return super().sanitize({rename(k): v for k, v in weights.items()})

    return Model, gemma3n.ModelArgs


def load_model(path: Path, *, lazy: bool = False):
    """(model, config) through mlx-lm, with our fixes applied.

    A `gemma3n_text` checkpoint (which mlx-lm refuses) is loaded as mlx-lm's `gemma3n`
    with the text config nested; the returned config says so, so that a converted copy
    loads in plain mlx-lm too.
    """
    from mlx_lm.utils import load_config
    from mlx_lm.utils import load_model as mlx_load_model

    from mlx_gemma_tune import hf_checkpoint, upstream

    upstream.warn_on_load()  # the fixes below were verified on upstream.VERIFIED
    get_classes = upstream.resolve("mlx_lm.utils:_get_classes")

    for f in hf_checkpoint.weight_files(Path(path)):  # headers only: name a truncated or corrupt file
        hf_checkpoint.inspect_weights(f, hash_it=False)
    raw = load_config(Path(path))
    if raw.get("model_type") == "gemma3n_text":
        text = {k: v for k, v in raw.items() if k not in ("architectures", "eos_token_id")}
        nested = {"model_type": "gemma3n", "architectures": ["Gemma3nForConditionalGeneration"],
                  "text_config": text}
        model, config = mlx_load_model(Path(path), lazy=lazy, strict=True, model_config=nested,
                                       get_model_classes=_gemma3n_text_classes)
        config = nested | ({"eos_token_id": config["eos_token_id"]} if "eos_token_id" in config else {})
    else:
        model, config = mlx_load_model(Path(path), lazy=lazy, strict=True, get_model_classes=get_classes)
    apply_fixes(model)
    return model, config


def load(path: Path, *, lazy: bool = False):
    """(model, tokenizer, config) for a local MLX or Hugging Face model directory."""
    from mlx_lm.utils import load_tokenizer

    model, config = load_model(path, lazy=lazy)
    tokenizer = load_tokenizer(Path(path), eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, config


def resolve_model_dir(path) -> Path:
    """A local model directory (MLX or Hugging Face) of a Gemma family we know, or a clear error."""
    from mlx_gemma_tune import families, hf_checkpoint
    from mlx_gemma_tune.errors import InputError

    p = Path(path).expanduser()
    if not p.is_dir():
        raise InputError("no such model directory", where=str(path),
                         hint="pass a directory made by `mlx-gemma-tune convert` or a Hugging Face model directory")
    families.detect(hf_checkpoint.read_config(p), where=str(p / "config.json"))
    return p
