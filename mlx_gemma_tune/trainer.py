"""The training loop: LoRA / QLoRA / DoRA on Gemma, built from MLX and mlx-lm parts.

Exact resume: the data order of every epoch is a function of (seed, epoch), dropout is
seeded by (seed, step), and a checkpoint holds the adapter, the optimizer state and the
trainer state; so a run stopped after step k and resumed computes the same losses as one
that never stopped. Progress reaches the caller through a callback object with
`on_train_report(info)` and `on_val_report(info)` (and optionally `on_event(kind, info)`).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlx_gemma_tune import fsio, losses
from mlx_gemma_tune.errors import NonFiniteError, OutputError, UserError

EMA = 0.9  # smoothing of the displayed training loss


@dataclass
class StepReport:
    step: int
    loss: float
    tokens: int
    grad_norm: float


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)
    tokens: int = 0


def make_step(model, optimizer, max_grad_norm: float | None = None, *, compile: bool = True,
              chunk: int | None = losses.DEFAULT_CHUNK, world=None):
    """A function (micro_batches) -> (loss, tokens, grad_norm, updated) doing one optimizer step.

    A micro-batch is (inputs, targets, mask) or (inputs, targets, mask, segments) for packed
    rows. Gradients of the summed token loss are accumulated over the micro-batches and divided
    by their total target-token count, so accumulation equals one large batch exactly. With a
    distributed `world` the micro-batches are this rank's shards (possibly none) and the sums are
    combined over the ranks first (mlx.nn.average_gradients x world size, all_sum of the counts),
    so the step equals one process running the global batch; loss and norm are global.
    Nothing is updated when the loss or the gradient norm is not finite. compile: the loss and
    gradient computation runs under mx.compile (the same numbers, tests/test_packing.py).
    """
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    from mlx_gemma_tune import distributed

    world = world or distributed.SINGLE
    value_and_grad = nn.value_and_grad(model, losses.masked_cross_entropy)  # (token-loss sum, count)

    def plain(inputs, targets, mask, idx, weights):
        return value_and_grad(model, inputs, targets, mask, None, chunk, (idx, weights), True)

    def packed(inputs, targets, mask, segments, idx, weights):
        return value_and_grad(model, inputs, targets, mask, segments, chunk, (idx, weights), True)

    def with_images(inputs, targets, mask, extra, idx, weights):  # not compiled: image sizes vary row to row
        return value_and_grad(model, inputs, targets, mask, None, chunk, (idx, weights), True, extra)

    if compile:
        # value_and_grad puts its (traced) parameters into the model, and dropout advances the
        # random state: both are outputs too, as in mlx-lm's compiled step
        state = [model.state, mx.random.state]
        plain = mx.compile(plain, inputs=state, outputs=state)
        packed = mx.compile(packed, inputs=state, outputs=state)
    dummy = mx.zeros((1,), dtype=mx.int32), mx.zeros((1,))

    def step(micro_batches):
        grads, total, count = None, mx.array(0.0), mx.array(0.0)
        for inputs, targets, mask, *rest in micro_batches:
            segments, extra = (list(rest) + [None, None])[:2]
            selected = losses.select_targets(mask, chunk) if chunk else dummy
            if extra:
                (s, n), g = with_images(inputs, targets, mask, extra, *selected)
            elif segments is None:
                (s, n), g = plain(inputs, targets, mask, *selected)
            else:
                (s, n), g = packed(inputs, targets, mask, segments, *selected)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            total, count = total + s, count + n
            mx.eval(grads, total, count)
        if world.distributed:
            if grads is None:  # no rows of this global batch fell to this rank
                grads = tree_map(mx.zeros_like, model.trainable_parameters())
            grads = tree_map(lambda g: g * world.size, nn.average_gradients(grads, group=world.group))
            total, count = distributed.all_sum(total, world), distributed.all_sum(count, world)
        denom = mx.maximum(count, 1.0)
        grads = tree_map(lambda g: g / denom, grads)
        loss = total / denom
        grads, norm = optim.clip_grad_norm(grads, max_grad_norm or float("inf"))
        mx.eval(loss, norm)
        loss_f, norm_f = float(loss), float(norm)
        if not (math.isfinite(loss_f) and math.isfinite(norm_f)):
            return loss_f, int(count), norm_f, False
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state)
        return loss_f, int(count), norm_f, True

    return step


def _non_finite(step: int, loss: float, norm: float, last_good: str | None = None) -> NonFiniteError:
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
    where = f"; the last good checkpoint is {last_good}" if last_good else ""
    return NonFiniteError(f"training stopped at step {step}: the {what}; the weights were not updated{where}",
                          hint="lower train.lr, or train in float32/bfloat16 (not float16)")


def fit(model, batches: Iterable, optimizer, *, max_grad_norm: float | None = None,
        on_step: Callable[[StepReport], None] | None = None, compile: bool = True,
        chunk: int | None = losses.DEFAULT_CHUNK) -> FitResult:
    """Train on every batch of `batches` once (one optimizer step each). For tests and scripts."""
    model.train()
    step = make_step(model, optimizer, max_grad_norm, compile=compile, chunk=chunk)
    result = FitResult()
    for i, batch in enumerate(batches, 1):
        loss, count, norm, ok = step([batch])
        if not ok:
            raise _non_finite(i, loss, norm)
        result.losses.append(loss)
        result.tokens += count
        if on_step:
            on_step(StepReport(i, loss, count, norm))
    model.eval()
    return result


# ---- the run ----------------------------------------------------------------------------------


@dataclass
class TrainSummary:
    run_dir: str
    steps: int
    total_steps: int
    final_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    adapter_from_step: int | None
    stopped_early: bool
    interrupted: bool
    seconds: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


class Control:
    """Lets a callback (or Ctrl-C) ask the loop to stop after the current step."""

    def __init__(self):
        self.stop_requested = False

    def request_stop(self) -> None:
        self.stop_requested = True


def run(prepared, *, callback=None, control: Control | None = None) -> TrainSummary:
    """Train a prepared run (see session.prepare_run) to its end, early stop, or a stop request.

    Distributed (prepared.world): every rank calls this; each trains on its shard of every global
    batch, all take the same decisions (steps, validation, early stop, Ctrl-C on any rank) and
    only rank 0 writes files or reports progress.
    """
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_gemma_tune import distributed, evaluate, lora, memory, models, multimodal, packing, rundir
    from mlx_gemma_tune.schedule import epoch_batches, lr_schedule

    p = prepared
    world = p.world
    cfg = p.recipe.train
    control = control or Control()
    emit = _Emitter(callback if world.main else None)
    model, run_dir = p.model, Path(p.run_dir)
    lengths = [len(e.tokens) for e in p.train]
    bins = packing.pack(lengths, p.recipe.data.max_seq_length) if p.recipe.data.pack else None
    n_batches = len(epoch_batches(lengths, cfg.batch_size, cfg.seed, 0, bins))
    steps_per_epoch = max(1, math.ceil(n_batches / cfg.grad_accumulation))
    total = cfg.iters or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = round(cfg.warmup_ratio * total)
    optimizer = optim.AdamW(learning_rate=lr_schedule(cfg.lr, cfg.schedule, warmup, total),
                            weight_decay=cfg.weight_decay)
    state = {"step": 0, "best_val_loss": None, "best_step": None, "bad_evals": 0, "ema": None,
             "metrics_lines": 0, "tokens": 0, "adapter_from_step": None}
    if p.resume_from is not None:
        if world.main:
            state, opt_state = rundir.read_checkpoint(p.resume_from)
        state = distributed.broadcast_json(state if world.main else None, world)
        flat = distributed.broadcast_arrays(dict(tree_flatten(opt_state)) if world.main else None, world)
        optimizer.state = tree_unflatten(list(flat.items()))
    metrics = rundir.Metrics(run_dir, keep_lines=state["metrics_lines"]) if world.main else rundir.MetricsInMemory()
    estimate = memory.estimate_for_run(p, bins, ranks=world.size)
    checkpointing = cfg.grad_checkpoint if cfg.grad_checkpoint is not None else estimate.over_budget
    if checkpointing:
        models.checkpoint_layers(model)
    step_fn = make_step(model, optimizer, cfg.max_grad_norm, compile=cfg.compile, chunk=cfg.loss_chunk, world=world)
    epoch_cache: dict[int, list[list[int]]] = {}

    def micro_batch(m: int):
        epoch, index = divmod(m, n_batches)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, bins)
        seqs = [[p.train[i] for i in seq] for seq in distributed.shard(epoch_cache[epoch][index], world)]
        if seqs and seqs[0][0].extra is not None:  # image rows: one row at a time (images differ in size)
            return [multimodal.batch(seq[0]) for seq in seqs], epoch
        return ([packing.batch_arrays(seqs)] if seqs else []), epoch

    def validate() -> float:
        model.eval()
        rows = p.valid if cfg.val_batches is None else p.valid[: cfg.val_batches * cfg.batch_size]
        rows = distributed.shard(rows, world)
        loss, count = evaluate.dataset_loss(model, rows, max(1, cfg.batch_size // world.size))
        if world.distributed:  # the token-weighted mean over every rank's rows
            sums = distributed.all_sum(mx.array([loss * count if count else 0.0, float(count)]), world)
            loss = float(sums[0] / sums[1]) if float(sums[1]) else float("nan")
        model.train()
        return loss

    def save(step: int) -> Path:
        if not p.valid:  # no validation: the run's adapter is the latest one
            state["adapter_from_step"] = step
        if not world.main:  # rank 0 writes; the others only keep the same bookkeeping
            return rundir.checkpoint_dir(run_dir, step)
        path = rundir.write_checkpoint(run_dir, step, model, p.lora, optimizer,
                                       state | {"metrics_lines": metrics.count})
        best = rundir.checkpoint_dir(run_dir, state["best_step"]) if state["best_step"] else None
        rundir.prune_checkpoints(run_dir, cfg.keep_checkpoints, protect=best)
        if not p.valid:
            rundir.publish_adapter(run_dir, path)
        emit.event("checkpoint", {"step": step, "path": str(path)})
        return path

    emit.event("start", {"total_steps": total, "start_step": state["step"], "steps_per_epoch": steps_per_epoch,
                         "train_rows": len(p.train), "valid_rows": len(p.valid), "run_dir": str(run_dir),
                         "trainable_parameters": lora.trainable_parameters(model), "modules": len(p.lora.modules),
                         "packed_sequences": len(bins) if bins is not None else None,
                         "grad_checkpoint": bool(checkpointing), "memory_estimate_gb": estimate.total_gb,
                         "memory_budget_gb": estimate.budget_gb})
    started = time.monotonic()
    window = {"loss": 0.0, "tokens": 0, "steps": 0, "t": time.perf_counter()}
    last_ckpt = (rundir.list_checkpoints(run_dir) or [None])[-1] if world.main else p.resume_from
    stopped_early = interrupted = False
    previous_handler = _install_sigint(control)
    model.train()
    try:
        while state["step"] < total:
            step = state["step"] + 1
            mx.random.seed(cfg.seed * 1_000_003 + step)  # dropout depends on (seed, step) only
            first = (step - 1) * cfg.grad_accumulation
            micro, epoch = [], 0
            for m in range(first, first + cfg.grad_accumulation):
                batches, epoch = micro_batch(m)
                micro += batches
            loss, count, norm, ok = step_fn(micro)
            if not ok:
                raise _non_finite(step, loss, norm, str(last_ckpt) if last_ckpt else None)
            state["step"] = step
            state["tokens"] += count
            state["ema"] = loss if state["ema"] is None else EMA * state["ema"] + (1 - EMA) * loss
            window["loss"] += loss
            window["tokens"] += count
            window["steps"] += 1
            if step % cfg.report_every == 0 or step == total:
                now = time.perf_counter()
                dt = max(now - window["t"], 1e-9)
                info = {"type": "train", "step": step, "total_steps": total, "epoch": epoch + 1,
                        "loss": window["loss"] / window["steps"], "smoothed_loss": state["ema"],
                        "lr": float(optimizer.learning_rate), "tokens_per_sec": window["tokens"] / dt,
                        "it_per_sec": window["steps"] / dt, "peak_memory_gb": mx.get_peak_memory() / 1e9,
                        "grad_norm": norm}
                metrics.write(info)
                emit.train(info | {"best_val_loss": state["best_val_loss"]})
                window = {"loss": 0.0, "tokens": 0, "steps": 0, "t": time.perf_counter()}
            if p.valid and (step % cfg.eval_every == 0 or step == total):
                val = validate()
                improved = state["best_val_loss"] is None or val < state["best_val_loss"]
                if improved:
                    state.update(best_val_loss=val, best_step=step, bad_evals=0)
                else:
                    state["bad_evals"] += 1
                patience = cfg.early_stopping_patience
                stop = patience is not None and state["bad_evals"] >= patience
                info = {"type": "val", "step": step, "val_loss": val, "best_val_loss": state["best_val_loss"],
                        "best_step": state["best_step"], "improved": improved}
                metrics.write(info)
                emit.val(info)
                if improved:  # the best adapter is the run's adapter: checkpoint it and publish it
                    state["adapter_from_step"] = step
                    last_ckpt = save(step)
                    if world.main:
                        rundir.publish_adapter(run_dir, last_ckpt)
                if stop:
                    stopped_early = True
                    emit.event("early_stop", {"step": step, "best_step": state["best_step"]})
                    break
            saved = last_ckpt == rundir.checkpoint_dir(run_dir, step)  # e.g. a new best just now
            # one decision for every rank: Ctrl-C on any of them stops all after this same step (a request
            # arriving after the vote counts at the next step)
            stop = distributed.any_rank(control.stop_requested, world)
            if (step % cfg.save_every == 0 or step == total or stop) and not saved:
                last_ckpt = save(step)
            if stop:
                interrupted = step < total
                break
    except (OSError, RuntimeError, UserError) as exc:
        full = fsio.disk_full(exc, run_dir)
        if full is None:
            raise
        kept = f"the last complete checkpoint, {last_ckpt}, is intact" if last_ckpt else "no checkpoint was complete"
        raise OutputError(f"could not be written: {full[1]} at step {state['step']}; {kept}", where=full[0],
                          hint=f"free some space, then: mlx-gemma-tune train --resume {run_dir}") from None
    finally:
        _restore_sigint(previous_handler)
        model.eval()
    if state["adapter_from_step"] is None and last_ckpt is not None:  # validation never improved on a saved step
        if world.main:
            rundir.publish_adapter(run_dir, last_ckpt)
        state["adapter_from_step"] = int(Path(last_ckpt).name.split("-")[1])
    if world.main:
        rundir.plot_losses(run_dir, metrics.read())
    train_records = [r for r in metrics.read() if r.get("type") == "train"]
    summary = TrainSummary(
        run_dir=str(run_dir), steps=state["step"], total_steps=total,
        final_loss=train_records[-1]["loss"] if train_records else None,
        best_val_loss=state["best_val_loss"], best_step=state["best_step"],
        adapter_from_step=state["adapter_from_step"], stopped_early=stopped_early, interrupted=interrupted,
        seconds=round(time.monotonic() - started, 2), tokens=state["tokens"])
    if world.main:
        fsio.atomic_write_json(run_dir / "summary.json", summary.to_dict())
    distributed.barrier(world)  # no rank exits (which ends the launch) before rank 0 has written
    emit.event("end", summary.to_dict())
    return summary


class _Emitter:
    def __init__(self, callback):
        self.cb = callback

    def train(self, info):
        if self.cb is not None:
            self.cb.on_train_report(info)

    def val(self, info):
        if self.cb is not None:
            self.cb.on_val_report(info)

    def event(self, kind, info):
        if self.cb is not None and hasattr(self.cb, "on_event"):
            self.cb.on_event(kind, info)


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
