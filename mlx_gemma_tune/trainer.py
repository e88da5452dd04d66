"""The training loop: LoRA / QLoRA / DoRA on Gemma, built from MLX and mlx-lm parts.

Exact resume: the data order of every epoch is a function of (seed, epoch), dropout is
seeded by (seed, step), and a checkpoint holds the adapter, the optimizer state and the
trainer state; so a run stopped after step k and resumed computes the same losses as one
that never stopped. Progress reaches the caller through a train_state.TrainCallback, in typed
reports (train_state.py), and the loss is a parameter (train_state.LossFunction).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlx_gemma_tune import preference
from mlx_gemma_tune.errors import OutputError, UserError
from mlx_gemma_tune.train_state import (
    Control,
    LossFunction,
    RunStart,
    TrainCallback,
    TrainReport,
    TrainState,
    TrainSummary,
    ValReport,
)
from mlx_gemma_tune.train_step import make_step, non_finite

EMA = 0.9  # smoothing of the displayed training loss


# ---- the run ----------------------------------------------------------------------------------


def run(prepared, *, callback: TrainCallback | None = None, control: Control | None = None,
        loss: LossFunction | None = None) -> TrainSummary:
    """Train a prepared run (see prepare.prepare_run) to its end, early stop, or a stop request.

    `callback` (a TrainCallback) hears the start, every report, validation and checkpoint, and the
    end; `control` lets it stop the run after a step; `loss` replaces the default objective
    (losses.masked_cross_entropy; see train_state.LossFunction). Distributed (prepared.world): every
    rank calls this; each trains on its shard of every global batch, all take the same decisions
    (steps, validation, early stop, Ctrl-C on any rank) and only rank 0 writes files or reports.
    Raises NonFiniteError on a NaN/inf loss or gradient (nothing updated), OutputError when the disk
    fills (the last complete checkpoint named)."""
    world = prepared.world
    return _Loop(prepared, callback if (callback is not None and world.main) else TrainCallback(),
                 control or Control(), loss).run()


@dataclass
class _Window:
    """The steps since the last training report."""
    loss: float = 0.0
    tokens: int = 0
    steps: int = 0
    t: float = field(default_factory=time.perf_counter)
    stats: list | None = None  # preference: summed preference.STATS
    pairs: int = 0


class _Loop:
    """One run, phase by phase: plan the steps, restore a checkpoint, then for each step train, report,
    validate and checkpoint; finish with the adapter, the plot and the summary."""

    def __init__(self, p, callback: TrainCallback, control: Control, loss: LossFunction | None):
        import mlx.optimizers as optim

        from mlx_gemma_tune import checkpointing, memory, rundir
        from mlx_gemma_tune.schedule import lr_schedule, plan

        self.p, self.world, self.cfg, self.cb, self.control = p, p.world, p.recipe.train, callback, control
        cfg = self.cfg
        self.model, self.run_dir = p.model, Path(p.run_dir)
        self.objective = preference.objective_of(cfg)  # None: sft
        if self.objective is not None and loss is None:
            loss = preference.PreferenceLoss(self.objective)
        self.reference = self.valid_reference = None  # dpo: the pairs' reference log-probabilities (N, 2)
        # plan: the batches of an epoch and the number of steps (a pair counts as its longer answer)
        self.lengths = [max(len(e.tokens), len(e.rejected.tokens)) if e.rejected is not None else len(e.tokens)
                        for e in p.train]
        self.bins, self.n_batches, self.steps_per_epoch, self.total = plan(self.lengths, p.recipe)
        warmup = round(cfg.warmup_ratio * self.total)
        self.optimizer = optim.AdamW(learning_rate=lr_schedule(cfg.lr, cfg.schedule, warmup, self.total),
                                     weight_decay=cfg.weight_decay)
        self.state = self._restore()
        self.metrics = (rundir.Metrics(self.run_dir, keep_lines=self.state.metrics_lines) if self.world.main
                        else rundir.MetricsInMemory())
        self.estimate = memory.estimate_with_checkpointing(p, self.bins, ranks=self.world.size)
        self.checkpointing = checkpointing.checkpoint_layers(self.model, self.estimate.checkpointed_layers)
        self.step_fn = make_step(self.model, self.optimizer, cfg.max_grad_norm, compile=cfg.compile,
                                 chunk=cfg.loss_chunk, world=self.world, loss=loss)
        self.epoch_cache: dict[int, list[list[int]]] = {}
        self.last_ckpt = ((rundir.list_checkpoints(self.run_dir) or [None])[-1] if self.world.main
                          else p.resume_from)
        self.window = _Window()
        self.stopped_early = self.interrupted = False

    # -- phases ----------------------------------------------------------------------------------
    def _restore(self) -> TrainState:
        """The state and optimizer of the checkpoint a resumed run continues (rank 0 reads, all get it)."""
        from mlx.utils import tree_flatten, tree_unflatten

        from mlx_gemma_tune import distributed, rundir

        if self.p.resume_from is None:
            return TrainState()
        state, opt_state = rundir.read_checkpoint(self.p.resume_from) if self.world.main else (None, None)
        state = distributed.broadcast_json(state, self.world)
        flat = distributed.broadcast_arrays(dict(tree_flatten(opt_state)) if self.world.main else None, self.world)
        self.optimizer.state = tree_unflatten(list(flat.items()))
        return TrainState.from_dict(state)

    def run(self) -> TrainSummary:
        from mlx_gemma_tune import fsio, lora

        p, cfg = self.p, self.cfg
        self.cb.on_start(RunStart(
            total_steps=self.total, start_step=self.state.step, steps_per_epoch=self.steps_per_epoch,
            train_rows=len(p.train), valid_rows=len(p.valid), run_dir=str(self.run_dir),
            trainable_parameters=lora.trainable_parameters(self.model), modules=len(p.lora.modules),
            packed_sequences=len(self.bins) if self.bins is not None else None,
            grad_checkpoint=bool(self.checkpointing), memory_estimate_gb=self.estimate.total_gb,
            memory_budget_gb=self.estimate.budget_gb, device=_device(), checkpointed_layers=self.checkpointing,
            layers=len(self.model.layers)))
        started = time.monotonic()
        if self.objective is not None and self.objective.needs_reference:
            self._reference()
        previous_handler = _install_sigint(self.control)
        previous_limit = _cap_memory(self.estimate.budget_gb if self.cfg.memory_guard else None)
        self.model.train()
        try:
            while self.state.step < self.total:
                step = self.state.step + 1
                epoch, norm = self._train_step(step)
                if step % cfg.report_every == 0 or step == self.total:
                    self._report(step, epoch, norm)
                if p.valid and (step % cfg.eval_every == 0 or step == self.total) and self._validate(step):
                    self.stopped_early = True
                    break
                if self._checkpoint_or_stop(step):
                    break
        except (OSError, RuntimeError, UserError) as exc:
            full = fsio.disk_full(exc, self.run_dir)
            if full is None:
                raise
            kept = (f"the last complete checkpoint, {self.last_ckpt}, is intact" if self.last_ckpt
                    else "no checkpoint was complete")
            raise OutputError(f"could not be written: {full[1]} at step {self.state.step}; {kept}", where=full[0],
                              hint=f"free some space, then: mlx-gemma-tune train --resume {self.run_dir}") from None
        finally:
            _restore_sigint(previous_handler)
            _cap_memory(None, previous_limit)
            self.model.eval()
        return self._finish(started)

    def _reference(self) -> None:
        """DPO's reference log-probabilities: computed by the model as the run starts (a new adapter is the
        identity: the base model; lora.init_from: that adapter), kept in the run for --resume."""
        p = self.p
        if p.resume_from is not None:  # the model has moved since: the reference must come from the run
            preference.check_reference(self.run_dir)
            self.reference, self.valid_reference = preference.load_reference(self.run_dir)
            return
        self.model.eval()
        batch, total = max(1, self.cfg.batch_size), len(p.train) + len(p.valid)
        self.reference = preference.reference_logps(self.model, p.train, batch, self.cfg.loss_chunk,
                                                    lambda done: self.cb.on_reference(done, total))
        self.valid_reference = (preference.reference_logps(
            self.model, p.valid, batch, self.cfg.loss_chunk, lambda done: self.cb.on_reference(len(p.train) + done,
                                                                                               total))
            if p.valid else None)
        self.cb.on_reference(total, total)
        self.model.train()
        if self.world.main:
            preference.save_reference(self.run_dir, self.reference, self.valid_reference)

    def _micro_batch(self, m: int):
        """The m-th micro-batch of the run (this rank's shard) and its epoch."""
        from mlx_gemma_tune import distributed, multimodal, packing
        from mlx_gemma_tune.schedule import epoch_batches

        epoch, index = divmod(m, self.n_batches)
        if epoch not in self.epoch_cache:
            self.epoch_cache.clear()
            self.epoch_cache[epoch] = epoch_batches(self.lengths, self.cfg.batch_size, self.cfg.seed, epoch, self.bins)
        shard = distributed.shard(self.epoch_cache[epoch][index], self.world)
        if self.objective is not None:  # preference pairs, one per sequence: chosen rows, then rejected rows
            if not shard:
                return [], epoch
            idx = [seq[0] for seq in shard]
            ref = None if self.reference is None else self.reference[idx]
            return [preference.pair_batch([self.p.train[i] for i in idx], ref)], epoch
        seqs = [[self.p.train[i] for i in seq] for seq in shard]
        if seqs and seqs[0][0].extra is not None:  # image rows: one row at a time (images differ in size)
            return [multimodal.batch(seq[0]) for seq in seqs], epoch
        return ([packing.batch_arrays(seqs)] if seqs else []), epoch

    def _train_step(self, step: int) -> tuple[int, float]:
        """One optimizer step over train.grad_accumulation micro-batches; (epoch, gradient norm)."""
        import mlx.core as mx

        cfg = self.cfg
        mx.random.seed(cfg.seed * 1_000_003 + step)  # dropout depends on (seed, step) only
        first = (step - 1) * cfg.grad_accumulation
        micro, epoch = [], 0
        for m in range(first, first + cfg.grad_accumulation):
            batches, epoch = self._micro_batch(m)
            micro += batches
        loss, count, norm, ok = self.step_fn(micro)
        if not ok:
            raise non_finite(step, loss, norm, str(self.last_ckpt) if self.last_ckpt else None)
        if self.step_fn.aux is not None:  # preference statistics: sums over this step's pairs
            w = self.window
            w.stats = [a + b for a, b in zip(w.stats or [0.0] * len(self.step_fn.aux), self.step_fn.aux)]
            w.pairs += count
            count = sum(float(mb[2].sum()) for mb in micro)  # target tokens, for the rates
            if self.world.distributed:
                import mlx.core as mx

                from mlx_gemma_tune import distributed

                count = float(distributed.all_sum(mx.array(count), self.world))
            count = int(count)
        s = self.state
        s.step, s.tokens = step, s.tokens + count
        s.ema = loss if s.ema is None else EMA * s.ema + (1 - EMA) * loss
        self.window.loss, self.window.tokens, self.window.steps = (self.window.loss + loss, self.window.tokens + count,
                                                                    self.window.steps + 1)
        return epoch, norm

    def _report(self, step: int, epoch: int, norm: float) -> None:
        import mlx.core as mx

        w = self.window
        dt = max(time.perf_counter() - w.t, 1e-9)
        report = TrainReport(step=step, total_steps=self.total, epoch=epoch + 1, loss=w.loss / w.steps,
                             smoothed_loss=self.state.ema, lr=float(self.optimizer.learning_rate),
                             tokens_per_sec=w.tokens / dt, it_per_sec=w.steps / dt,
                             peak_memory_gb=mx.get_peak_memory() / 1e9, grad_norm=norm,
                             best_val_loss=self.state.best_val_loss,
                             preference=(dict(zip(preference.STATS, (v / max(w.pairs, 1) for v in w.stats)))
                                         if w.stats is not None else None))
        self.metrics.write(report.record())
        self.cb.on_train_report(report)
        self.window = _Window()

    def _validate(self, step: int) -> bool:
        """Validate; checkpoint and publish a new best adapter; True when early stopping ends the run."""
        import mlx.core as mx

        from mlx_gemma_tune import distributed, evaluate, rundir

        p, cfg, s = self.p, self.cfg, self.state
        self.model.eval()
        rows = p.valid if cfg.val_batches is None else p.valid[: cfg.val_batches * cfg.batch_size]
        stats = None
        if self.objective is not None:  # every rank scores every held-out pair (they are few)
            ref = None if self.valid_reference is None else self.valid_reference[: len(rows)]
            stats = preference.evaluate_pairs(self.model, rows, ref, self.objective, max(1, cfg.batch_size),
                                              cfg.loss_chunk)
            val = stats.pop("loss")
        else:
            rows = distributed.shard(rows, self.world)
            val, count = evaluate.dataset_loss(self.model, rows, max(1, cfg.batch_size // self.world.size))
        if self.world.distributed and self.objective is None:  # the token-weighted mean over every rank's rows
            sums = distributed.all_sum(mx.array([val * count if count else 0.0, float(count)]), self.world)
            val = float(sums[0] / sums[1]) if float(sums[1]) else float("nan")
        self.model.train()
        if cfg.early_stopping_metric == "reward_accuracy" and stats is not None:  # higher is better; ties: loss
            acc = stats["reward_accuracy"]
            improved = s.best_reward_accuracy is None or acc > s.best_reward_accuracy or (
                acc == s.best_reward_accuracy and val < s.best_val_loss)
            if improved:
                s.best_reward_accuracy = acc
        else:
            improved = s.best_val_loss is None or val < s.best_val_loss
        if improved:
            s.best_val_loss, s.best_step, s.bad_evals = val, step, 0
        else:
            s.bad_evals += 1
        report = ValReport(step=step, val_loss=val, best_val_loss=s.best_val_loss, best_step=s.best_step,
                           improved=improved, preference=stats)
        self.metrics.write(report.record())
        self.cb.on_val_report(report)
        if improved:  # the best adapter is the run's adapter: checkpoint it and publish it
            s.adapter_from_step = step
            self.last_ckpt = self._save(step)
            if self.world.main:
                rundir.publish_adapter(self.run_dir, self.last_ckpt)
        if cfg.early_stopping_patience is not None and s.bad_evals >= cfg.early_stopping_patience:
            self.cb.on_early_stop(step, s.best_step)
            return True
        return False

    def _checkpoint_or_stop(self, step: int) -> bool:
        """Checkpoint when due (or stopping); True when a stop request (Ctrl-C, a callback) ends the run."""
        from mlx_gemma_tune import distributed, rundir

        saved = self.last_ckpt == rundir.checkpoint_dir(self.run_dir, step)  # e.g. a new best just now
        # one decision for every rank: Ctrl-C on any of them stops all after this same step (a request
        # arriving after the vote counts at the next step)
        stop = distributed.any_rank(self.control.stop_requested, self.world)
        if (step % self.cfg.save_every == 0 or step == self.total or stop) and not saved:
            self.last_ckpt = self._save(step)
        if stop:
            self.interrupted = step < self.total
        return stop

    def _save(self, step: int) -> Path:
        from mlx_gemma_tune import rundir

        if not self.p.valid:  # no validation: the run's adapter is the latest one
            self.state.adapter_from_step = step
        if not self.world.main:  # rank 0 writes; the others only keep the same bookkeeping
            return rundir.checkpoint_dir(self.run_dir, step)
        path = rundir.write_checkpoint(self.run_dir, step, self.model, self.p.lora, self.optimizer,
                                       self.state.to_dict() | {"metrics_lines": self.metrics.count})
        best = rundir.checkpoint_dir(self.run_dir, self.state.best_step) if self.state.best_step else None
        rundir.prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints, protect=best)
        if not self.p.valid:
            rundir.publish_adapter(self.run_dir, path)
        self.cb.on_checkpoint(step, str(path))
        return path

    def _finish(self, started: float) -> TrainSummary:
        """The run's adapter, loss plot and summary.json."""
        from mlx_gemma_tune import distributed, fsio, rundir

        s, main = self.state, self.world.main
        if s.adapter_from_step is None and self.last_ckpt is not None:  # validation never improved on a saved step
            if main:
                rundir.publish_adapter(self.run_dir, self.last_ckpt)
            s.adapter_from_step = int(Path(self.last_ckpt).name.split("-")[1])
        if main:
            rundir.plot_losses(self.run_dir, self.metrics.read())
        train_records = [r for r in self.metrics.read() if r.get("type") == "train"]
        summary = TrainSummary(
            run_dir=str(self.run_dir), steps=s.step, total_steps=self.total,
            final_loss=train_records[-1]["loss"] if train_records else None,
            best_val_loss=s.best_val_loss, best_step=s.best_step, adapter_from_step=s.adapter_from_step,
            stopped_early=self.stopped_early, interrupted=self.interrupted,
            seconds=round(time.monotonic() - started, 2), tokens=s.tokens)
        if main:
            fsio.atomic_write_json(self.run_dir / "summary.json", summary.to_dict())
        distributed.barrier(self.world)  # no rank exits (which ends the launch) before rank 0 has written
        self.cb.on_end(summary)
        return summary


def _cap_memory(budget_gb: float | None, restore: int | None = None) -> int | None:
    """Cap MLX's memory at the machine's budget (GiB) for the run, so that an underestimate makes MLX
    wait for memory rather than push the machine into swap; returns the previous limit. With
    budget None, set `restore` back (when given)."""
    import mlx.core as mx

    if budget_gb is None:
        return mx.set_memory_limit(restore) if restore is not None else None
    return mx.set_memory_limit(int(budget_gb * 2**30))


def _device() -> str:
    import mlx.core as mx

    return "cpu" if mx.default_device() == mx.cpu else "gpu"


def _install_sigint(control: Control):
    """First Ctrl-C: stop after this step and checkpoint. Second: stop now.

    A distributed run starts with SIGINT blocked (cli.App.main), so the threads MLX starts for its
    collectives inherit the block; unblocking it here, in the main thread alone, keeps a Ctrl-C
    from interrupting a transfer halfway: it only sets the flag the ranks vote on each step."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        if control.stop_requested:
            raise KeyboardInterrupt
        control.request_stop()

    previous = signal.signal(signal.SIGINT, handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    return previous


def _restore_sigint(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)
