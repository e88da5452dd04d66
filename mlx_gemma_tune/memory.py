"""Peak-memory estimate of a training step, from the model config and the run's settings.

peak = weights + adapter (parameters, gradients, two AdamW moments, all float32)
     + activations kept for the backward pass + the loss's logits work.

Activations per token and decoder layer are counted in "widths" of the tensors MLX keeps:
ACT_LINEAR copies of the layer's hidden / projection / MLP widths and ACT_SCORES copies of the
attention scores (heads x sequence length: attention is materialised on the backward path).
With gradient checkpointing only each layer's input is kept, plus one layer being recomputed.
The loss holds float32 tensors of tokens x vocabulary: PLAIN_LOGIT_COPIES over all tokens for the
plain loss; for the chunked one SLICE_COPIES per slice of `loss_chunk` target tokens, because MLX
enqueues the next slices' work (and allocates their outputs) before the current one finishes, up
to MAX_SLICE_COPIES (the loss alone: 1, 2, 3, 4, 6 slices of 256 -> 3, 6, 9, 10, 11 copies; inside
a training step 3 and 4 slices peaked at ~7.8, since the trunk's work competes for the queue). The
activation constants were fitted to benchmarks/train_speed.py's seq512 and seq2048 runs on Gemma 3
270M, with and without gradient checkpointing. benchmarks/README.md compares estimate and measured
peak per configuration; tests/test_memory.py checks two fixture configurations (within 15%).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ACT_LINEAR = 2.7  # float-widths of hidden / projection / MLP tensors kept per token per layer
ACT_SCORES = 2.0  # attention-score-sized tensors (heads x keys) per token per layer
SLICE_COPIES = 3.0  # float32 (slice x vocab) tensors of one slice of the chunked loss (logits, softmax, gradient)
MAX_SLICE_COPIES = 8.0  # at most this many alive across slices (MLX's run-ahead; measured in training steps)
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


def estimate(config: dict, *, weight_bytes: int, adapter_parameters: int, batch: int, seq_len: int,
             loss_chunk: int | None, grad_checkpoint: bool, act_bytes: int = 4, targets: int | None = None,
             budget_bytes: int | None = None) -> Estimate:
    """Predicted peak of one training step. targets: target tokens per batch (default: all)."""
    from mlx_gemma_tune import families

    text = families.text_config(config)
    width, heads, layers, vocab = _widths(text)
    tokens = batch * seq_len
    per_layer = act_bytes * tokens * (ACT_LINEAR * width + ACT_SCORES * heads * seq_len)
    if grad_checkpoint:
        activations = act_bytes * tokens * int(text["hidden_size"]) * layers + per_layer
    else:
        activations = per_layer * layers
    if loss_chunk:
        loss = 4 * vocab * _slice_copies(targets if targets is not None else tokens, loss_chunk)
    else:
        loss = 4 * PLAIN_LOGIT_COPIES * vocab * tokens
    adapter = 4 * 4 * adapter_parameters  # parameters, gradients, AdamW m and v
    total = weight_bytes + adapter + activations + loss
    return Estimate(weights_gb=weight_bytes / GIB, adapter_gb=adapter / GIB, activations_gb=activations / GIB,
                    loss_gb=loss / GIB, total_gb=total / GIB,
                    budget_gb=(budget_bytes / GIB) if budget_bytes else None, batch=batch, seq_len=seq_len,
                    grad_checkpoint=grad_checkpoint, loss_chunk=loss_chunk)


def _slice_copies(targets: int, chunk: int) -> float:
    """Slice-sized logit arrays alive at the chunked loss's peak, times the slice size (in tokens)."""
    from mlx_gemma_tune.losses import padded_count

    padded = padded_count(targets, chunk)
    size = min(chunk, padded)
    return size * min(SLICE_COPIES * (padded // size), MAX_SLICE_COPIES)


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


def estimate_for_run(prepared, bins=None, grad_checkpoint: bool = False, ranks: int = 1) -> Estimate:
    """The estimate for a prepared run (prepare.prepare_run), at its largest micro-batch (per rank:
    a distributed run holds 1/ranks of each global batch on each Mac)."""
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
    return _for_model(p.model, p.config, batch=batch, seq_len=max(seq_len - 1, 1),
                      loss_chunk=cfg.loss_chunk, grad_checkpoint=grad_checkpoint, targets=targets)


def check_fits(prepared, bins=None, ranks: int = 1) -> None:
    """Refuse a run whose estimated peak exceeds the machine's budget even with gradient checkpointing
    (or without it, when train.grad_checkpoint is false): one line with the numbers and the switches
    that lower it. train.memory_guard: false skips this. Raises UserError."""
    from mlx_gemma_tune.errors import UserError

    cfg = prepared.recipe.train
    if not cfg.memory_guard:
        return
    est = estimate_for_run(prepared, bins, grad_checkpoint=cfg.grad_checkpoint is not False, ranks=ranks)
    if not est.over_budget:
        return
    ckpt = "" if cfg.grad_checkpoint is False else " with gradient checkpointing"
    raise UserError(f"the estimated peak memory of a training step{ckpt}, {est.total_gb:.1f} GiB, exceeds this "
                    f"machine's budget of {est.budget_gb:.1f} GiB by {est.total_gb - est.budget_gb:.1f} GiB",
                    where="memory", hint="lower it: QLoRA (--quantize 4), a smaller train.batch_size (with "
                    "train.grad_accumulation to keep the effective batch) or data.max_seq_length, "
                    "train.grad_checkpoint: true; or --set train.memory_guard=false to start anyway")


def _for_model(model, config: dict, **settings) -> Estimate:
    """estimate() for a loaded model with its adapter applied (the adapter is float32)."""
    from mlx_gemma_tune import lora

    adapter = lora.trainable_parameters(model)
    return estimate(config, weight_bytes=model_bytes(model) - 4 * adapter, adapter_parameters=adapter,
                    act_bytes=activation_bytes(model), budget_bytes=budget_bytes(), **settings)


def estimate_for_model(model_path, recipe) -> Estimate:
    """The estimate for a model directory and a recipe, before any data is read.

    The batch is the recipe's batch_size of full data.max_seq_length rows, every token a target
    (the worst case); the model's weights are not read (lazy load), only their shapes.
    """
    from mlx_gemma_tune import demo, lora, models

    model, config = models.load_model(models.resolve_model_dir(demo.resolve_alias(model_path)), lazy=True)
    lo = recipe.lora
    lora.apply(model, config, lora.LoraSettings(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout,
                                                targets=lo.targets, num_layers=lo.num_layers,
                                                experts=lo.experts, method=lo.method))
    t = recipe.train
    return _for_model(model, config, batch=t.batch_size, seq_len=recipe.data.max_seq_length,
                      loss_chunk=t.loss_chunk, grad_checkpoint=bool(t.grad_checkpoint))
