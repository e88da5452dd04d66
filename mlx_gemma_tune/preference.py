"""Preference tuning: DPO (sigmoid and IPO losses) and ORPO on the chunked, Gemma-exact loss.

A micro-batch of B pairs is 2B rows, the chosen answers first, then the rejected ones, each row a
pair's shared prompt (masked) and one answer (the targets). A row's log-probability is the sum of
its target tokens' log-probabilities, computed like the SFT loss (losses.token_losses: only target
positions get logits, a slice at a time, with each slice's gradient made while its logits exist),
so a 262k vocabulary never costs full logits.

- DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) with summed
  log-probabilities; IPO (Azar et al. 2023): ((avg_c - avg_ref_c) - (avg_r - avg_ref_r) - 1/(2 beta))^2
  on per-token average log-probabilities, as TRL computes it.
- ORPO (Hong et al. 2024): the chosen answer's mean token NLL + lambda * -log sigmoid(log odds(c) -
  log odds(r)), odds(y) = p / (1 - p) with p the answer's per-token average probability; no reference.

The reference log-probabilities of every pair are computed once, before the first step, by the model
as it starts (reference_logps): a new LoRA / DoRA adapter starts as the identity (B = 0), so that is
exactly the base model, and with lora.init_from it is the SFT adapter the run starts from, as DPO
prescribes, with no second copy of the weights and no reference forward pass per step (TRL's
precompute_ref_log_probs). A run keeps them in reference_logps.safetensors for --resume.

Rewards (for the metrics): DPO beta * (pi - ref) of each answer; ORPO lambda * avg log-prob (TRL).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlx_gemma_tune import losses

REFERENCE_FILE = "reference_logps.safetensors"
STATS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")


@dataclass(frozen=True)
class Objective:
    """A preference objective: name dpo | orpo, beta (DPO's beta / ORPO's lambda), dpo_loss sigmoid | ipo."""
    name: str
    beta: float = 0.1
    dpo_loss: str = "sigmoid"

    @property
    def needs_reference(self) -> bool:
        return self.name == "dpo"


def objective_of(train_config) -> Objective | None:
    """The Objective of a recipe's train section (None for sft)."""
    if train_config.objective == "sft":
        return None
    if train_config.objective == "orpo":
        return Objective("orpo", train_config.orpo_lambda)
    return Objective("dpo", train_config.beta, train_config.dpo_loss)


def row_logps(model, inputs, targets, mask, chunk: int | None = losses.DEFAULT_CHUNK, selected=None,
              grad: bool = False):
    """(sum of target-token log-probabilities per row (R,), target tokens per row (R,)), float32.

    inputs / targets int32 (R, L), mask (R, L) weights (0 = not a target); computed like
    losses.masked_cross_entropy (chunked over the target positions when the model's head can be
    split, else over full logits)."""
    import mlx.core as mx
    import mlx.nn as nn

    rows, length = mask.shape
    counts = mask.sum(axis=1)
    parts = losses.split_head(model) if chunk else None
    if parts is None:
        out = model(inputs)
        logits = getattr(out, "logits", out).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, targets, reduction="none")
        return -(mx.where(mask > 0, ce * mask, 0.0)).sum(axis=1), counts
    hidden_fn, linear, cap = parts
    hidden = hidden_fn(inputs)
    idx, weights = selected if selected is not None else losses.select_targets(mask, chunk)
    h = hidden.reshape(-1, hidden.shape[-1])[idx]
    ce = losses.token_losses(linear, cap, chunk, grad)(h, targets.reshape(-1)[idx])  # (M,)
    owner = (idx // length)[:, None] == mx.arange(rows)[None, :]  # (M, R): which row each target is in
    return -((ce * weights)[None, :] @ owner.astype(mx.float32))[0], counts


def pair_loss(objective: Objective, logps, counts, reference=None):
    """(sum of the pairs' losses, number of pairs, stats (len(STATS),) summed over pairs), in MLX.

    logps / counts / reference: (2B,) float32, the B chosen answers then the B rejected ones;
    reference (DPO only) the reference model's summed log-probabilities of the same rows."""
    import mlx.core as mx
    import mlx.nn as nn

    b = logps.shape[0] // 2
    n = mx.maximum(counts, 1.0)
    pc, pr = logps[:b], logps[b:]
    if objective.name == "dpo":
        rc, rr = reference[:b], reference[b:]
        if objective.dpo_loss == "ipo":
            diff = (pc - rc) / n[:b] - (pr - rr) / n[b:]
            loss = mx.square(diff - 1.0 / (2.0 * objective.beta))
        else:
            loss = -nn.log_sigmoid(objective.beta * ((pc - rc) - (pr - rr)))
        chosen_r, rejected_r = objective.beta * (pc - rc), objective.beta * (pr - rr)
    else:  # orpo
        ac, ar = pc / n[:b], pr / n[b:]  # per-token average log-probabilities (< 0)
        log_odds = (ac - _log1mexp(ac)) - (ar - _log1mexp(ar))
        loss = -ac - objective.beta * nn.log_sigmoid(log_odds)
        chosen_r, rejected_r = objective.beta * ac, objective.beta * ar
    chosen_r, rejected_r = mx.stop_gradient(chosen_r), mx.stop_gradient(rejected_r)
    stats = mx.stack([(chosen_r > rejected_r).astype(mx.float32).sum(), (chosen_r - rejected_r).sum(),
                      chosen_r.sum(), rejected_r.sum(), mx.stop_gradient(pc).sum(), mx.stop_gradient(pr).sum()])
    return loss.sum(), mx.array(float(b)), stats


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stably (Maechler 2012). Each branch sees only the inputs it is chosen for
    (the other gets -1), so neither puts an infinite gradient through the where; x is kept below -1e-7
    (an answer of probability 1 would have infinite odds)."""
    import mlx.core as mx

    x = mx.minimum(x, -1e-7)
    near = x > -0.6931472
    return mx.where(near, mx.log(-mx.expm1(mx.where(near, x, -1.0))), mx.log1p(-mx.exp(mx.where(near, -1.0, x))))


class PreferenceLoss:
    """A train_state.LossFunction for preference micro-batches: (model, inputs, targets, mask, segments,
    chunk, selected, grad, extra) -> (loss sum, pairs, stats). extra["reference"]: the rows' reference
    log-probabilities (2B,) for DPO."""

    stats = STATS

    def __init__(self, objective: Objective):
        self.objective = objective

    def __call__(self, model, inputs, targets, mask, segments=None, chunk=losses.DEFAULT_CHUNK, selected=None,
                 grad=False, extra=None):
        logps, counts = row_logps(model, inputs, targets, mask, chunk, selected, grad)
        return pair_loss(self.objective, logps, counts, (extra or {}).get("reference"))


def pair_batch(pairs: list, reference=None):
    """One preference micro-batch: (inputs, targets, mask, None, {"reference": (2B,)}) from examples that
    carry their rejected answer (data.Example.rejected); reference: their (chosen, rejected) rows (B, 2)."""
    import mlx.core as mx
    import numpy as np

    from mlx_gemma_tune import packing

    seqs = [[e] for e in pairs] + [[e.rejected] for e in pairs]
    inputs, targets, mask = packing.batch_arrays(seqs)[:3]
    extra = {}
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float32).reshape(-1, 2)
        extra["reference"] = mx.array(np.concatenate([ref[:, 0], ref[:, 1]]))
    return inputs, targets, mask, None, extra


def reference_logps(model, examples: list, batch_size: int, chunk: int | None = losses.DEFAULT_CHUNK,
                    progress=None):
    """(N, 2) float32 numpy: the summed log-probabilities of each pair's chosen and rejected answer under
    `model` as it is now (evaluation mode, no dropout); progress(pairs done) after each batch."""
    import mlx.core as mx
    import numpy as np

    out = np.zeros((len(examples), 2), dtype=np.float32)
    for s in range(0, len(examples), batch_size):
        if progress:
            progress(s)
        part = examples[s: s + batch_size]
        inputs, targets, mask, _, _ = pair_batch(part)
        logps, _ = row_logps(model, inputs, targets, mask, chunk)
        mx.eval(logps)
        got = np.array(logps)
        out[s: s + len(part), 0], out[s: s + len(part), 1] = got[: len(part)], got[len(part):]
    return out


def evaluate_pairs(model, examples: list, reference, objective: Objective, batch_size: int,
                   chunk: int | None = losses.DEFAULT_CHUNK) -> dict:
    """{"loss": mean pair loss, and the STATS as means over the pairs} of `model` on held-out pairs."""
    import mlx.core as mx
    import numpy as np

    total, pairs, stats = 0.0, 0, np.zeros(len(STATS))
    for s in range(0, len(examples), batch_size):
        part = examples[s: s + batch_size]
        inputs, targets, mask, _, extra = pair_batch(part, None if reference is None else reference[s: s + len(part)])
        value, n, st = PreferenceLoss(objective)(model, inputs, targets, mask, chunk=chunk, extra=extra)
        mx.eval(value, st)
        total, pairs, stats = total + float(value), pairs + int(n.item()), stats + np.array(st)
    pairs = max(pairs, 1)
    return {"loss": total / pairs} | {k: float(v) / pairs for k, v in zip(STATS, stats)}


def save_reference(run_dir: Path, train, valid) -> None:
    """Keep the reference log-probabilities ((N, 2) train, (V, 2) valid or None) in the run directory."""
    import mlx.core as mx

    from mlx_gemma_tune import fsio

    arrays = {"train": mx.array(train)} | ({"valid": mx.array(valid)} if valid is not None and len(valid) else {})
    fsio.atomic_save_safetensors(Path(run_dir) / REFERENCE_FILE, arrays)


def check_reference(run_dir: Path) -> None:
    """UserError unless a DPO run directory holds the reference log-probabilities it started with (a resumed
    run cannot recompute them: its model has moved)."""
    from mlx_gemma_tune.errors import UserError

    path = Path(run_dir) / REFERENCE_FILE
    if not path.is_file():
        raise UserError("is missing: a DPO run cannot resume without the reference log-probabilities it started "
                        "with", where=str(path), hint="start the run again")


def load_reference(run_dir: Path):
    """(train (N, 2), valid (V, 2) or None) saved by save_reference, as numpy float32."""
    import mlx.core as mx
    import numpy as np

    loaded = mx.load(str(Path(run_dir) / REFERENCE_FILE))
    return np.array(loaded["train"]), (np.array(loaded["valid"]) if "valid" in loaded else None)
