"""Peak-memory estimate of a training step, from the model config and the run's settings.

peak = weights + adapter (parameters, gradients, two AdamW moments, all float32)
     + activations kept for the backward pass + the loss's logits work.

Activations per token and decoder layer are counted in "widths" of the tensors MLX keeps:
ACT_LINEAR copies of the layer's hidden / projection / MLP widths and ACT_SCORES float32 copies of
the attention probabilities (heads x the keys each query meets in attention.py's blocks: about
window + block on a sliding layer, half the sequence on a global one). A checkpointed layer keeps
only its input; the checkpointed layers are the first ones, recomputed last in the backward pass
when the later layers' activations are freed, so recomputing adds nothing to the peak (measured);
train.grad_checkpoint chooses how many (checkpointing.py).
The loss holds float32 tensors of tokens x vocabulary: PLAIN_LOGIT_COPIES over all tokens for the
plain loss; for the chunked one SLICE_COPIES per slice of `loss_chunk` target tokens (its logits and
their exponentials), because MLX enqueues the next slices' work (and allocates their outputs) before
the current one finishes, up to MAX_SLICE_COPIES (the loss alone on the 270M's 896 padded targets held
7 copies at slices of 128, 192 and 256; inside a training step, where the trunk's work shares the
queue, the peak sat ~3 slices higher, with and without checkpointing). The constants were fitted to
benchmarks/train_speed.py's seq2048 runs on Gemma 3 270M (2,036 tokens; no layer and 10 of 18
checkpointed: within 3%).
benchmarks/README.md compares estimate and measured peak per configuration; tests/test_memory.py
checks fixture configurations (within 15%).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ACT_LINEAR = 2.81  # float-widths of hidden / projection / MLP tensors kept per token per layer
ACT_SCORES = 1.0  # float32 attention probabilities (heads x keys met) per token per layer: one per block
SLICE_COPIES = 2.0  # float32 (slice x vocab) tensors of one slice of the chunked loss (logits, exponentials)
MAX_SLICE_COPIES = 10.0  # at most this many alive across slices (MLX's run-ahead; fitted, see below)
PLAIN_LOGIT_COPIES = 3.8  # the same for the plain loss over all tokens (fitted on plain mlx-lm's seq512 run)
BUDGET_SHARE = 0.8  # of physical memory, where MLX reports no recommended working set
GIB = 2**30


@dataclass
class Estimate:
    weights_gb: float
    adapter_gb: float
    activations_gb: float
    loss_gb: float
    total_gb: float
    budget_gb: float | None
    batch: int
    seq_len: int
    grad_checkpoint: bool
    loss_chunk: int | None
    checkpointed_layers: int = 0  # of `layers`
    layers: int = 0

    @property
    def over_budget(self) -> bool:
        return self.budget_gb is not None and self.total_gb > self.budget_gb

    def to_dict(self) -> dict:
        return asdict(self) | {"over_budget": self.over_budget}


def _widths(text: dict) -> tuple[int, int, int, int]:
    """(linear width, attention heads, layers, vocabulary) of a text config."""
    hidden = int(text["hidden_size"])
    heads = int(text.get("num_attention_heads", 8))
    head_dim = int(text.get("head_dim") or hidden // heads)
    kv = int(text.get("num_key_value_heads") or heads)
    inter = text.get("intermediate_size") or 4 * hidden
    inter = max(inter) if isinstance(inter, list) else int(inter)
    if text.get("enable_moe_block") or text.get("num_experts"):  # Gemma 4 MoE: dense MLP + top-k experts
        inter += int(text.get("moe_intermediate_size") or inter) * int(text.get("top_k_experts") or 1)
    streams = int(text.get("altup_num_inputs") or 1)  # Gemma 3n carries several hidden streams
    width = hidden * (2 + streams) + heads * head_dim + 2 * kv * head_dim + 2 * inter
    return width, heads, int(text["num_hidden_layers"]), int(text["vocab_size"])


def layer_windows(text: dict) -> list[int | None]:
    """Each decoder layer's sliding window (None: global attention), from layer_types or the
    sliding-window pattern of a text config (all global when it has neither)."""
    n, window = int(text["num_hidden_layers"]), text.get("sliding_window")
    types = text.get("layer_types")
    if types and len(types) == n:
        return [window if t == "sliding_attention" else None for t in types]
    pattern = text.get("sliding_window_pattern") or text.get("_sliding_window_pattern")
    if window and pattern:
        return [None if (i + 1) % int(pattern) == 0 else int(window) for i in range(n)]
    return [None] * n


def estimate(config: dict, *, weight_bytes: int, adapter_parameters: int, batch: int, seq_len: int,
             loss_chunk: int | None, grad_checkpoint: bool | int, act_bytes: int = 4, targets: int | None = None,
             budget_bytes: int | None = None, eligible: list[int] | None = None) -> Estimate:
    """Predicted peak of one training step, in bytes turned to GiB (Estimate).

    targets: target tokens per batch (default: all). grad_checkpoint: True (every eligible layer),
    False / 0 (none) or a number of layers: the first of `eligible` (layer indices; default all), as
    checkpointing.first chooses them.
    """
    from mlx_gemma_tune import attention, checkpointing, families

    text = families.text_config(config)
    width, heads, layers, vocab = _widths(text)
    tokens = batch * seq_len
    eligible = list(range(layers)) if eligible is None else eligible
    count = len(eligible) if grad_checkpoint is True else int(grad_checkpoint or 0)
    chosen = set(checkpointing.first(count, eligible))
    per_layer = [tokens * (act_bytes * ACT_LINEAR * width + 4 * ACT_SCORES * heads * attention.keys_per_query(
        seq_len, w)) for w in layer_windows(text)]
    kept = act_bytes * tokens * int(text["hidden_size"])  # a checkpointed layer's input
    # the first layers are checkpointed: the backward pass recomputes them last, when the later layers'
    # activations are freed, so the peak stays where the loss runs (measured: all 18 of the 270M's)
    activations = sum(kept if i in chosen else a for i, a in enumerate(per_layer))
    if loss_chunk:
        loss = 4 * vocab * _slice_copies(targets if targets is not None else tokens, loss_chunk)
    else:
        loss = 4 * PLAIN_LOGIT_COPIES * vocab * tokens
    adapter = 4 * 4 * adapter_parameters  # parameters, gradients, AdamW m and v
    total = weight_bytes + adapter + activations + loss
    return Estimate(weights_gb=weight_bytes / GIB, adapter_gb=adapter / GIB, activations_gb=activations / GIB,
                    loss_gb=loss / GIB, total_gb=total / GIB,
                    budget_gb=(budget_bytes / GIB) if budget_bytes else None, batch=batch, seq_len=seq_len,
                    grad_checkpoint=bool(chosen), loss_chunk=loss_chunk, checkpointed_layers=len(chosen),
                    layers=layers)


def _slice_copies(targets: int, chunk: int) -> float:
    """Slice-sized logit arrays alive at the chunked loss's peak, times the slice size (in tokens)."""
    from mlx_gemma_tune.losses import padded_count

    padded = padded_count(targets, chunk)
    size = min(chunk, padded)
    return size * min(SLICE_COPIES * -(-padded // size), MAX_SLICE_COPIES)


def budget_bytes() -> int | None:
    """The machine's memory budget: MLX's recommended working set on a Mac, else a share of RAM."""
    import mlx.core as mx

    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if info.get("max_recommended_working_set_size"):
        return int(info["max_recommended_working_set_size"])
    from mlx_gemma_tune import doctor

    total = info.get("memory_size") or doctor.total_memory()
    return int(total * BUDGET_SHARE) if total else None


def model_bytes(model) -> int:
    """Bytes of every array of a loaded model (weights, quantization scales, adapters)."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def activation_bytes(model) -> int:
    """Bytes per activation value: the dtype of the model's float weights."""
    from mlx.utils import tree_flatten

    for _, v in tree_flatten(model.parameters()):
        if v.dtype.size in (2, 4) and "float" in str(v.dtype):
            return v.dtype.size
    return 4


def estimate_for_run(prepared, bins=None, grad_checkpoint: bool | int = False, ranks: int = 1) -> Estimate:
    """The estimate for a prepared run (prepare.prepare_run), at its largest micro-batch (per rank:
    a distributed run holds 1/ranks of each global batch on each Mac). grad_checkpoint: True (every
    layer that can be), False / 0, or a number of layers."""
    return _run_estimator(prepared, bins, ranks)(grad_checkpoint)


def _run_estimator(prepared, bins=None, ranks: int = 1):
    """n -> the run's estimate with n checkpointed layers (the micro-batch's shape measured once)."""
    p = prepared
    batch = -(-p.recipe.train.batch_size // ranks)
    cfg = p.recipe.train
    if bins is not None:
        seq_len = max(sum(len(p.train[i].tokens) for i in b) for b in bins)
        targets = sum(sorted((sum(sum(p.train[i].mask) for i in b) for b in bins), reverse=True)[:batch])
    else:
        rows = [r for e in p.train for r in ((e, e.rejected) if e.rejected is not None else (e,))]
        if len(rows) > len(p.train):  # preference pairs: a micro-batch holds both answers of each pair
            batch *= 2
        seq_len = max((len(e.tokens) for e in rows), default=1)
        targets = sum(sorted((sum(e.mask) for e in rows), reverse=True)[:batch])
    return lambda n: _for_model(p.model, p.config, batch=batch, seq_len=max(seq_len - 1, 1),
                                loss_chunk=cfg.loss_chunk, grad_checkpoint=n, targets=targets)


def estimate_with_checkpointing(prepared, bins=None, ranks: int = 1) -> Estimate:
    """The estimate at the number of checkpointed layers train.grad_checkpoint asks for: auto (or null)
    the fewest that fit the machine's budget (checkpointing.resolve; none when the run fits as it is,
    all when nothing fits), true all, false none, a number that many."""
    from mlx_gemma_tune import checkpointing

    return checkpointing.resolve(prepared.recipe.train.grad_checkpoint,
                                 len(checkpointing.eligible_layers(prepared.model)),
                                 _run_estimator(prepared, bins, ranks))


def check_fits(prepared, bins=None, ranks: int = 1) -> None:
    """Refuse a run whose estimated peak exceeds the machine's budget even with the gradient checkpointing
    train.grad_checkpoint allows (all layers for auto / true; none for false; that many for a number):
    one line with the numbers and the switches that lower it. train.memory_guard: false skips this.
    Raises UserError."""
    from mlx_gemma_tune.errors import UserError

    cfg = prepared.recipe.train
    if not cfg.memory_guard:
        return
    setting = True if cfg.grad_checkpoint in (None, "auto") else cfg.grad_checkpoint
    est = estimate_for_run(prepared, bins, grad_checkpoint=setting, ranks=ranks)
    if not est.over_budget:
        return
    ckpt = "" if not est.checkpointed_layers else (
        " with gradient checkpointing" + ("" if est.checkpointed_layers == est.layers
                                          else f" of {est.checkpointed_layers} layers"))
    raise UserError(f"the estimated peak memory of a training step{ckpt}, {est.total_gb:.1f} GiB, exceeds this "
                    f"machine's budget of {est.budget_gb:.1f} GiB by {est.total_gb - est.budget_gb:.1f} GiB",
                    where="memory", hint="lower it: QLoRA (--quantize 4), a smaller train.batch_size (with "
                    "train.grad_accumulation to keep the effective batch) or data.max_seq_length, "
                    "train.grad_checkpoint: true; or --set train.memory_guard=false to start anyway")


def _for_model(model, config: dict, **settings) -> Estimate:
    """estimate() for a loaded model with its adapter applied (the adapter is float32); checkpointing
    counts only the layers checkpointing.eligible_layers allows."""
    from mlx_gemma_tune import checkpointing, lora

    adapter = lora.trainable_parameters(model)
    return estimate(config, weight_bytes=model_bytes(model) - 4 * adapter, adapter_parameters=adapter,
                    act_bytes=activation_bytes(model), budget_bytes=budget_bytes(),
                    eligible=checkpointing.eligible_layers(model), **settings)


def estimate_for_model(model_path, recipe) -> Estimate:
    """The estimate for a model directory and a recipe, before any data is read.

    The batch is the recipe's batch_size of full data.max_seq_length rows, every token a target
    (the worst case); the model's weights are not read (lazy load), only their shapes.
    """
    from mlx_gemma_tune import checkpointing, demo, lora, models

    model, config = models.load_model(models.resolve_model_dir(demo.resolve_alias(model_path)), lazy=True)
    lo = recipe.lora
    lora.apply(model, config, lora.LoraSettings(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout,
                                                targets=lo.targets, num_layers=lo.num_layers,
                                                experts=lo.experts, method=lo.method))
    t = recipe.train

    def at(ckpt) -> Estimate:
        return _for_model(model, config, batch=t.batch_size, seq_len=recipe.data.max_seq_length,
                          loss_chunk=t.loss_chunk, grad_checkpoint=ckpt)

    # as train will: auto checkpoints the fewest layers that fit
    return checkpointing.resolve(t.grad_checkpoint, len(checkpointing.eligible_layers(model)), at)
