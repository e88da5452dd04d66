"""What `train` shows: the live dashboard (step, losses, learning rate, tokens/s, memory, a loss
sparkline) and the run's summary. Part of the ui package, the only place that imports rich."""

from __future__ import annotations

import time

from rich.table import Table

from mlx_gemma_tune import ui
from mlx_gemma_tune.train_state import RunStart, TrainCallback, TrainReport, ValReport

SPARK = "▁▂▃▄▅▆▇█"


def rate(x: float) -> str:
    """A throughput with the digits it deserves: 1234, 12.3, 0.42 (never a misleading 0)."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.01 else f"{x:.1e}"


def duration(seconds: float) -> str:
    """3h 05m, 12m 30s, 45s."""
    s = round(seconds)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def sparkline(values: list[float], width: int = 24) -> str:
    vals = values[-width:]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1)))] for v in vals)


class TrainDashboard(TrainCallback):
    """The live training view, fed by the trainer's callbacks (train_state.TrainCallback).

    On a terminal: a progress bar with ETA and a live table. Otherwise (CI, pipes, logs):
    one plain line per report, so logs stay readable.
    """

    def __init__(self, console=None):
        self.console = console or ui.out
        self.live = None
        self.losses: list[float] = []
        self.last: TrainReport | None = None
        self.val: ValReport | None = None
        self.total = 0
        self.start_step = 0
        self.started = time.monotonic()
        self.estimate_gb: float | None = None  # the run's memory estimate, in GB like the measured peak
        self.reference: tuple[int, int] | None = None  # DPO: (pairs scored, pairs) by the reference model

    # -- context ------------------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop()
        return False

    def _stop(self):
        if self.live is not None:
            self.live.stop()
            self.live = None

    # -- callbacks ----------------------------------------------------------------------------
    def on_start(self, start: RunStart) -> None:
        self.total, self.start_step, self.started = start.total_steps, start.start_step, time.monotonic()
        self.estimate_gb = start.memory_estimate_gb * 2**30 / 1e9 if start.memory_estimate_gb else None
        resumed = f", resuming after step {self.start_step}" if self.start_step else ""
        self.console.print(f"Training {start.modules} adapted modules ({ui.human_count(start.trainable_parameters)} "
                           f"trainable parameters) on {start.train_rows} rows, {start.valid_rows} validation "
                           f"rows, {self.total} steps{resumed} -> {start.run_dir}", soft_wrap=True)
        if start.memory_estimate_gb is not None:
            packed = f"{start.packed_sequences} packed sequences; " if start.packed_sequences else ""
            budget = f" of a {start.memory_budget_gb:.1f} GiB budget" if start.memory_budget_gb else ""
            n = start.checkpointed_layers
            ckpt = "off" if not n else f"{n} of {start.layers} layers" if n < start.layers else f"all {n} layers"
            self.console.print(f"{packed}estimated peak memory {start.memory_estimate_gb:.2f} GiB{budget}; "
                               f"gradient checkpointing {ckpt}", soft_wrap=True)
        if start.device == "cpu":
            self.console.print("MLX runs on the CPU here (no Metal GPU): expect seconds per step, not milliseconds",
                               soft_wrap=True)
        if self.console.is_terminal:
            from rich.live import Live
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("step"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=self.total, completed=self.start_step)
            self.live = Live(self._render(), console=self.console, refresh_per_second=4)
            self.live.start()

    def on_reference(self, done: int, total: int) -> None:
        self.reference = (done, total)
        if self.live is not None:
            self.live.update(self._render())
        elif done == 0:
            self.console.print(f"Scoring {total} pairs with the reference model (once, before the first step; kept "
                               "for --resume)", soft_wrap=True)
        elif done == total:
            self.console.print(f"reference log-probabilities ready ({duration(time.monotonic() - self.started)})",
                               soft_wrap=True)

    def on_early_stop(self, step: int, best_step: int | None) -> None:
        self._line(f"early stop at step {step}: no better validation loss since step {best_step}")

    def on_end(self, summary) -> None:
        self._stop()

    def on_train_report(self, report: TrainReport) -> None:
        self.last = report
        self.losses.append(report.loss)
        if self.live is not None:
            self.progress.update(self.task, completed=report.step)
            self.live.update(self._render())
        else:
            r = report
            self.console.print(
                f"step {r.step}/{r.total_steps} epoch {r.epoch} loss {r.loss:.4f} smoothed {r.smoothed_loss:.4f} "
                f"lr {r.lr:.2e} tok/s {rate(r.tokens_per_sec)} it/s {rate(r.it_per_sec)} "
                f"peak {r.peak_memory_gb:.2f} GB{self._of_estimate()}{self._eta(r.step)}{_pairs(r.preference)}",
                soft_wrap=True)

    def on_val_report(self, report: ValReport) -> None:
        self.val = report
        if self.live is not None:
            self.live.update(self._render())
        else:
            best = "(new best)" if report.improved else f"(best {report.best_val_loss:.4f} at step {report.best_step})"
            self.console.print(f"step {report.step} val_loss {report.val_loss:.4f} {best}{_pairs(report.preference)}",
                               soft_wrap=True)

    def _of_estimate(self) -> str:
        return f" (estimate {self.estimate_gb:.2f})" if self.estimate_gb else ""

    def _eta(self, step: int) -> str:
        """ ' eta 12m 30s' from this run's pace so far (nothing at the last step)."""
        done = step - self.start_step
        if done <= 0 or step >= self.total:
            return ""
        return f" eta {duration((time.monotonic() - self.started) / done * (self.total - step))}"

    def _line(self, text: str) -> None:
        (self.live.console if self.live is not None else self.console).print(text, soft_wrap=True)

    def _render(self):
        from rich.console import Group

        t = Table(show_header=False, box=None, padding=(0, 2))
        t.add_column(style="bold")
        t.add_column()
        last = self.last
        if self.reference is not None and self.reference[0] < self.reference[1]:
            t.add_row("reference", f"scoring pairs {self.reference[0]}/{self.reference[1]} (once, before the first step)")
        if last:
            t.add_row("epoch", str(last.epoch))
            t.add_row("loss", f"{last.loss:.4f}  (smoothed {last.smoothed_loss:.4f})  {sparkline(self.losses)}")
        if last and last.preference:
            t.add_row("pairs", _pairs(last.preference).strip())
        if self.val:
            t.add_row("val loss", f"{self.val.val_loss:.4f}  (best {self.val.best_val_loss:.4f} at step "
                      f"{self.val.best_step})")
            if self.val.preference:
                t.add_row("val pairs", _pairs(self.val.preference).strip())
        if last:
            t.add_row("lr", f"{last.lr:.2e}")
            t.add_row("speed", f"{rate(last.tokens_per_sec)} tok/s, {rate(last.it_per_sec)} it/s")
            t.add_row("peak memory", f"{last.peak_memory_gb:.2f} GB{self._of_estimate()}")
        return Group(self.progress, t)


def _pairs(stats: dict | None) -> str:
    """' reward acc 75% margin 3.74 chosen -18.8 rejected -157.6' (log-probs in nats) for preference runs."""
    if not stats:
        return ""
    return (f" reward acc {stats['reward_accuracy']:.0%} margin {stats['reward_margin']:.3g} "
            f"logp chosen {stats['chosen_logp']:.1f} rejected {stats['rejected_logp']:.1f}")


def show_train_summary(s, interrupted_hint: str | None = None) -> None:
    t = Table(title="Run", show_header=False, title_justify="left", box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("Run directory", s.run_dir)
    t.add_row("Steps", f"{s.steps} of {s.total_steps}" + (" (stopped early)" if s.stopped_early else "")
              + (" (interrupted)" if s.interrupted else ""))
    if s.final_loss is not None:
        t.add_row("Last train loss", f"{s.final_loss:.4f}")
    if s.best_val_loss is not None:
        t.add_row("Best val loss", f"{s.best_val_loss:.4f} at step {s.best_step}")
    if s.adapter_from_step is not None:
        t.add_row("Adapter", f"{s.run_dir}/adapters.safetensors (step {s.adapter_from_step})")
    t.add_row("Tokens", f"{s.tokens:,}")
    t.add_row("Time", f"{s.seconds:.1f} s")
    ui.out.print(t)
    if interrupted_hint:
        ui.err.print(interrupted_hint, soft_wrap=True)
