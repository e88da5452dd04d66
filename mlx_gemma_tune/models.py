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
"""

from __future__ import annotations

import functools
from pathlib import Path

# sha256 of inspect.getsource() of each mlx-lm function we override, for the version we
# verified. tests/test_exactness.py fails when mlx-lm's code changes, so the override is
# re-checked (and dropped, once upstream is fixed) instead of silently going stale.
OVERRIDDEN_SOURCE_SHA256 = {
    "mlx_lm.models.gemma3n.LanguageModel.__call__": "5db8a11a0416d7554bd66b22118aa354a0b449b3767333e25e76fdf1772991f0",
    "mlx_lm.models.gemma3n.MLP.__call__": "ddd94c5780f459cc756baa25d6ad311c54834630927f3481c0aa69bcfb65f8ee",
    "mlx_lm.models.gemma3n.gelu_topk": "eb6974558c7fbe0f2dddd4c46d6d87524127efa67414090e55f1c55221d94b8d",
    "mlx_lm.models.gemma3_text.Gemma3Model.__call__": "e65de4285bbd483539024393fa63f30974a7a05b1f551a53ff5b4196c9889653",
}
ALTUP_EPS = 1e-5  # transformers' Gemma3nTextModel clamps mean(x^2) here
TOPK_VAR_EPS = 1e-12


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


@functools.cache
def _gemma3n_language_model_class():
    import mlx.core as mx
    from mlx_lm.models import gemma3n
    from mlx_lm.models.base import create_attention_mask

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
    import mlx.nn as nn
    from mlx_lm.models import gemma3n

    class MLP(gemma3n.MLP):
        """mlx-lm's Gemma 3n MLP whose Gaussian top-k has a finite gradient on zero rows."""

        def __call__(self, x):
            gate = self.gate_proj(x)
            if self.activation_sparsity > 0.0:
                mean = mx.mean(gate, axis=-1, keepdims=True)
                var = mx.mean(mx.square(gate - mean), axis=-1, keepdims=True)
                std = mx.sqrt(mx.maximum(var, TOPK_VAR_EPS))
                cutoff = mean + std * self._std_multiplier.astype(std.dtype)
                act = nn.gelu_approx(mx.maximum(0, gate - cutoff))
            else:
                act = nn.gelu_approx(gate)
            return self.down_proj(act * self.up_proj(x))

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
    from mlx_lm.models.base import create_attention_mask

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


# model_type (as mlx-lm builds it) -> fixes applied to every loaded model of that type
FIXES = {"gemma3n": (_fix_gemma3n,), "gemma3_text": (_fix_gemma3_text,), "gemma3": (_fix_gemma3_text,)}


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


# ---- gradient checkpointing ------------------------------------------------------------------


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


def checkpoint_layers(model) -> int:
    """Make every decoder layer recompute its activations in the backward pass; returns how many.

    Gemma 3n's KV-sharing layers pass K/V through cache objects (a side channel mx.checkpoint
    cannot differentiate through), so its KV-source and KV-shared layers are left as they are.
    """
    layers = model.layers
    inner = getattr(getattr(model, "model", None), "language_model", None)
    skip: set[int] = set()
    if inner is not None and hasattr(inner, "layer_idx_to_cache_idx"):
        first = inner.first_kv_shared_layer_idx
        skip = set(range(first, len(layers))) | {inner.layer_idx_to_cache_idx[i] for i in range(first, len(layers))}
    count = 0
    for i, layer in enumerate(layers):
        if i in skip:
            continue
        if not getattr(type(layer), "_mgt_checkpointed", False):
            layer.__class__ = _checkpointed_class(type(layer))
        count += 1
    return count


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
