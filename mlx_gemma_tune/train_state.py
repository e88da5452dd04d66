"""The training loop's typed state and reports, and the callback protocol it calls.

TrainState is a checkpoint's state.json; TrainReport and ValReport are the lines of metrics.jsonl
(`record()` gives the line, unchanged since the first runs); RunStart and TrainSummary open and
close a run. A callback subclasses TrainCallback and overrides what it needs (ui.train.TrainDashboard
is the CLI's). A Control lets a callback, or Ctrl-C, stop the run after the current step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

# The loss a training step differentiates: (model, inputs, targets, mask, segments, chunk, selected, grad,
# extra=None) -> (sum of the per-token losses, number of target tokens), both mlx scalars, and optionally
# a third, statistics summed like the loss (preference.PreferenceLoss: per pair, not per token). The default
# is losses.masked_cross_entropy (next-token cross-entropy on the masked tokens, chunked over the
# vocabulary); another objective plugs in here without touching the loop.
LossFunction = Callable[..., tuple]


@dataclass
class TrainState:
    """Where a run is: a checkpoint's state.json (old checkpoints load: missing keys take defaults)."""
    step: int = 0  # optimizer steps done
    best_val_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # validations since the best one (early stopping)
    ema: float | None = None  # smoothed training loss shown by the dashboard
    metrics_lines: int = 0  # metrics.jsonl lines written up to this checkpoint (a resume truncates to them)
    tokens: int = 0  # target tokens trained on
    adapter_from_step: int | None = None  # the step whose adapter is the run's adapter
    best_reward_accuracy: float | None = None  # dpo / orpo with train.early_stopping_metric reward_accuracy

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class RunStart:
    """What the loop knows when it starts (on_start)."""
    total_steps: int
    start_step: int  # > 0 when resuming
    steps_per_epoch: int
    train_rows: int
    valid_rows: int
    run_dir: str
    trainable_parameters: int
    modules: int  # adapted modules
    packed_sequences: int | None  # with data.pack
    grad_checkpoint: bool  # some layers are recomputed in the backward pass
    memory_estimate_gb: float | None  # GiB, with the checkpointing chosen
    memory_budget_gb: float | None  # GiB
    device: str = "gpu"  # where MLX computes: "gpu" (Metal) or "cpu"
    checkpointed_layers: int = 0  # of `layers` decoder layers
    layers: int = 0


@dataclass
class TrainReport:
    """A training report, every train.report_every steps: a `train` line of metrics.jsonl."""
    step: int
    total_steps: int
    epoch: int  # 1-based
    loss: float  # mean loss over the steps since the last report (sft: nats per target token; dpo / orpo: per pair)
    smoothed_loss: float  # exponential moving average (trainer.EMA) of the step losses
    lr: float
    tokens_per_sec: float  # target tokens per second since the last report
    it_per_sec: float
    peak_memory_gb: float  # MLX's peak memory, GB (1e9 bytes)
    grad_norm: float  # of the last step, before clipping
    best_val_loss: float | None = None  # shown by the dashboard, not written to metrics.jsonl
    # dpo / orpo: means over the pairs since the last report (preference.STATS: reward_accuracy 0..1,
    # reward_margin, chosen_reward, rejected_reward in nats x beta; chosen_logp, rejected_logp in nats)
    preference: dict | None = None

    def record(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("best_val_loss", "preference")}
        return {"type": "train"} | out | (self.preference or {})


@dataclass
class ValReport:
    """A validation, every train.eval_every steps and at the end: a `val` line of metrics.jsonl."""
    step: int
    val_loss: float
    best_val_loss: float
    best_step: int
    improved: bool
    preference: dict | None = None  # dpo / orpo: preference.STATS over the held-out pairs (as TrainReport)

    def record(self) -> dict:
        return {"type": "val"} | {k: v for k, v in asdict(self).items() if k != "preference"} | {
            f"val_{k}": v for k, v in (self.preference or {}).items()}


@dataclass
class TrainSummary:
    """How a run ended (summary.json)."""
    run_dir: str
    steps: int
    total_steps: int
    final_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    adapter_from_step: int | None  # the step the run's adapter comes from
    stopped_early: bool
    interrupted: bool
    seconds: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


class TrainCallback:
    """What the training loop tells its caller, on rank 0 only; every method does nothing by default."""

    def on_start(self, start: RunStart) -> None:
        """Once, before the first step."""

    def on_reference(self, done: int, total: int) -> None:
        """DPO, before the first step: the reference model has scored `done` of `total` pairs (from 0)."""

    def on_train_report(self, report: TrainReport) -> None:
        """Every train.report_every steps and at the last step."""

    def on_val_report(self, report: ValReport) -> None:
        """After every validation."""

    def on_checkpoint(self, step: int, path: str) -> None:
        """After a checkpoint is complete on disk."""

    def on_early_stop(self, step: int, best_step: int | None) -> None:
        """When train.early_stopping_patience validations passed without a better loss."""

    def on_end(self, summary: TrainSummary) -> None:
        """Once, after summary.json is written."""


class Control:
    """Lets a callback (or Ctrl-C) ask the loop to stop after the current step."""

    def __init__(self):
        self.stop_requested = False

    def request_stop(self) -> None:
        self.stop_requested = True
