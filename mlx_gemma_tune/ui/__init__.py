"""Everything the user sees: consoles, spinners, progress bars, JSON and the reports of convert,
doctor, data check, eval, fuse, export and quickstart. ui.chat (chat / generate) and ui.train (the
training dashboard) are its two submodules; this package is the only place that imports rich.

Library functions return values and report progress through callbacks; the
functions here turn those into spinners, tables and JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.table import Table

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def human_count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


@contextmanager
def status(first: str = "Working") -> Iterator[Callable[[str], None]]:
    """A spinner on stderr; yields the callback that library code calls with each stage."""
    with err.status(first) as st:
        yield st.update


def _grouped(rows: list[dict], detail) -> list[str]:
    """Collapse per-layer rows ("layers.0.x", "layers.1.x", ...) into one line per pattern."""
    import re

    groups: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        m = re.search(r"\.layers\.(\d+)\.", row["path"])
        pattern = re.sub(r"\.layers\.\d+\.", ".layers.*.", row["path"]) if m else row["path"]
        groups.setdefault((pattern, detail(row)), []).append(int(m.group(1)) if m else -1)
    lines = []
    for (pattern, why), layers in groups.items():
        count = f" ({len(layers)} layers)" if len(layers) > 1 else ""
        lines.append(f"[yellow]{pattern}[/]{count}: {why}")
    return lines


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr; yields the callback (done, total) for library code."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def show_loss(r) -> None:
    out.print(f"loss [bold]{r.loss:.4f}[/]  perplexity {r.perplexity:.3f}  "
              f"({r.tokens:,} target tokens in {r.rows:,} rows of {r.data})", soft_wrap=True)
    if r.truncated:
        err.print(f"[yellow]warning:[/] {r.truncated} rows were longer than --max-seq-length and were truncated")
    if r.dropped:
        err.print(f"[yellow]warning:[/] {len(r.dropped)} rows had no answer token left after truncation and were "
                  f"left out (e.g. {', '.join(r.dropped[:3])})", highlight=False, soft_wrap=True)


def stage(message: str) -> None:
    """One line per stage of a long job, on stderr."""
    err.print(f"[dim]•[/] {message}", soft_wrap=True)


def show_eval(r) -> None:
    labels = list(r.scores) or list(r.loss or {}) or sorted(r.preference or {})  # "base" before "tuned"
    t = Table(title=f"{r.data} ({r.rows} rows)", title_justify="left")
    t.add_column("metric")
    for label in labels:
        t.add_column(label, justify="right")
    keys = list(next(iter(r.scores.values()), {}))
    for key in keys:
        t.add_row(key, *[f"{r.scores[label][key]:.3f}" for label in labels])
    for key in ("loss", "perplexity"):
        if r.loss:
            t.add_row(key, *[f"{r.loss[label][key]:.4f}" if label in r.loss else "" for label in labels])
    for key in ("reward_accuracy", "implicit_reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp"):
        if r.preference and any(key in r.preference.get(label, {}) for label in labels):
            t.add_row(key.replace("_", " "), *[f"{r.preference[label][key]:.3f}" if key in r.preference.get(label, {})
                                              else "" for label in labels])
    if r.classification:
        t.add_row("accuracy", *[f"{r.classification[label]['accuracy']:.3f}" for label in labels])
        t.add_row("macro F1", *[f"{r.classification[label]['macro_f1']:.3f}" for label in labels])
    if r.judge:
        t.add_row("judge overall", *[("-" if r.judge[label]["overall"] is None else f"{r.judge[label]['overall']:.2f}")
                                    for label in labels])
        t.add_row("judge unparsable", *[str(r.judge[label]["unparsable"]) for label in labels])
        head = r.judge.get("tuned", {}).get("vs_base")
        if head and head["win_rate"] is not None:
            t.add_row("judge win rate", *["" if label != "tuned" else
                                          f"{head['win_rate']:.0%} ({head['wins']}-{head['ties']}-{head['losses']})"
                                          for label in labels])
    out.print(t)
    for row in r.differ_most or []:
        out.print(f"{row['where']}: {row['prompt']}\n  base:  {row['answer_base']}\n  tuned: {row['answer_tuned']}\n"
                  f"  reference: {row['reference']}", markup=False, soft_wrap=True)
    if r.output:
        out.print(f"per-row results: {r.output}", markup=False)


def print_json(obj) -> None:
    # Plain stdout, no Rich markup or wrapping, so scripts can parse it.
    import click

    click.echo(json.dumps(_finite(obj), indent=2, allow_nan=False))


def _finite(obj):
    """obj with NaN / infinities as null: JSON has no such numbers (json.dumps would write NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def show_convert(r) -> None:
    t = Table(title="Converted", show_header=False, title_justify="left", box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("Family", f"{r.family} — {r.variant} ({r.model_type})")
    t.add_row("Source", r.source)
    t.add_row("Output", r.output)
    t.add_row("Parameters", f"{human_count(r.parameters)} " + ("(with the towers)" if r.multimodal else "(text model)"))
    t.add_row("Dtype", r.dtype)
    if r.quantization:
        q = r.quantization
        t.add_row("Quantized", f"{r.quantized_layers} layers to {q['bits']}-bit, group size {q['group_size']}")
        for line in _grouped(r.kept_at_higher_precision, lambda k: f"{k['bits']}-bit, {k['reason']}"):
            t.add_row("", line)
        if r.unquantized:
            t.add_row("Left unquantized", f"{len(r.unquantized)} layers")
            for line in _grouped(r.unquantized, lambda u: u["reason"]):
                t.add_row("", line)
        else:
            t.add_row("Left unquantized", "none")
    else:
        t.add_row("Quantized", "no")
    if r.dropped:
        for d in r.dropped:
            t.add_row("Dropped", f"{d['component']}: {d['tensors']} tensors, {human_count(d['parameters'])} parameters "
                      "(kept in the source; export restores it)")
    else:
        t.add_row("Dropped", "nothing")
    if r.quality:
        q = r.quality
        t.add_row("Quality cost", f"perplexity {q['perplexity_source']:.4g} -> {q['perplexity_quantized']:.4g} "
                  f"({q['perplexity_quantized'] / q['perplexity_source'] - 1:+.2%}), same greedy next token at "
                  f"{q['top1_agreement']:.1%} of {q['tokens']} positions of {q['text']}")
        t.add_row("Worst layers", ", ".join(f"{w['path']} ({w['bits']}-bit: {w['rel_error']:.1%} weight error)"
                                            for w in q["worst_layers"][:3]))
    t.add_row("Size on disk", human_bytes(r.size_bytes))
    t.add_row("Time", f"{r.seconds:.1f} s")
    out.print(t)


def show_doctor(rep) -> None:
    t = Table(title="mlx-gemma-tune doctor", show_header=False, title_justify="left", box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("Python", f"{rep.python} on {rep.platform}")
    for pkg, ver in rep.packages.items():
        t.add_row(pkg, ver or "[red]not installed[/]")
    t.add_row("MLX device", rep.device)
    t.add_row("Memory", human_bytes(rep.memory_bytes))
    if rep.recommended_working_set_bytes:
        t.add_row("Recommended working set", human_bytes(rep.recommended_working_set_bytes))
    if rep.blas is not None:
        libs = ", ".join(rep.blas["libraries"]) or "unknown"
        verdict = "[green]fast[/]" if rep.blas["fast"] else "[yellow]slow[/]"
        t.add_row("BLAS", f"{libs}: {rep.blas['gflops']} GFLOP/s fp32 ({verdict})")
    t.add_row("HF_HUB_OFFLINE", "on" if rep.hf_offline else "off")
    d = rep.distributed
    if d.get("error"):
        t.add_row("Distributed", f"[red]{d['error']}[/]")
    elif d["size"] > 1:
        t.add_row("Distributed", f"world size {d['size']} (this is rank {d['rank']})")
    else:
        t.add_row("Distributed", "world size 1 (start under mlx.launch to train on several Macs)"
                  if d["available"] else "not available in this MLX build")
    for o in rep.optional:
        state = o["installed"] or f"[dim]missing[/] — {o['install']}"
        t.add_row(o["package"], f"{state} ({o['enables']})")
    out.print(t)
    for p in rep.problems:
        err.print(f"[yellow]warning:[/] {p}", soft_wrap=True)


def show_memory_estimate(model: str, est) -> None:
    t = Table(title=f"Estimated peak memory of a training step: {model}", show_header=False,
              title_justify="left", box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_column(style="dim")
    loss = f"chunked, {est.loss_chunk} tokens per slice" if est.loss_chunk else "plain: full logits"
    t.add_row("Weights", f"{est.weights_gb:.2f} GiB", "")
    t.add_row("Adapter + optimizer", f"{est.adapter_gb:.2f} GiB", "parameters, gradients, AdamW moments")
    t.add_row("Activations", f"{est.activations_gb:.2f} GiB",
              f"batch {est.batch} x {est.seq_len} tokens" + (
                  f", gradient checkpointing {est.checkpointed_layers} of {est.layers} layers"
                  if est.grad_checkpoint else ""))
    t.add_row("Loss (logits)", f"{est.loss_gb:.2f} GiB", loss)
    t.add_row("Total", f"{est.total_gb:.2f} GiB", "")
    if est.budget_gb:
        t.add_row("Budget", f"{est.budget_gb:.2f} GiB", "this machine's recommended working set")
    out.print(t)
    if est.over_budget:
        err.print("[yellow]warning:[/] over budget: lower train.batch_size or data.max_seq_length, set "
                  "train.grad_checkpoint: true, or quantize the base (model.quantize: 4)", soft_wrap=True)


def show_data_report(r) -> None:
    t = Table(title=f"Dataset {r.path}", show_header=False, title_justify="left", box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("Rows", ", ".join(f"{split} {n:,}" for split, n in r.splits.items()))
    t.add_row("Formats", ", ".join(f"{fmt} {n:,}" for fmt, n in r.formats.items()))
    lengths = r.lengths
    t.add_row(f"Length ({r.length_unit})", f"min {lengths['min']}  mean {lengths['mean']}  p50 {lengths['p50']}  "
              f"p95 {lengths['p95']}  max {lengths['max']}")
    if r.too_long is None:
        t.add_row("Over max length", "pass --model to count rows in tokens")
    else:
        at = f" (e.g. {', '.join(r.too_long_at)})" if r.too_long_at else ""
        t.add_row(f"Over {r.max_seq_length} tokens", f"{r.too_long}{at}")
    t.add_row("Duplicates", f"{r.duplicates}" + (f" (e.g. {'; '.join(r.duplicates_at)})" if r.duplicates_at else ""))
    t.add_row("Empty fields", f"{r.empty}" + (f" (e.g. {', '.join(r.empty_at)})" if r.empty_at else ""))
    if r.special_tokens_adjusted:
        t.add_row("Special tokens", f"{r.special_tokens_adjusted} text row(s) already hold them, not added twice "
                  f"(e.g. {'; '.join(r.special_tokens_adjusted_at)})")
    if r.reasoning:
        t.add_row("With reasoning", f"{r.reasoning} row(s): the thought is trained with thinking on (Gemma 4; "
                  "data.reasoning: drop trains the answers only; Gemma 3 / 3n need drop)")
    if r.tool_use:
        t.add_row("With tool calls", f"{r.tool_use} row(s): the calls and answers are trained, the tool results are "
                  "prompt (Gemma 4; Gemma 3 / 3n have no tool format)")
    t.add_row("Refused by the template", str(len(r.refused)))
    out.print(t)
    for line in r.refused:
        out.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)


def show_fuse(r) -> None:
    out.print(f"Fused {r.fused_layers} adapted layers of {r.adapter} -> {r.output} ({human_bytes(r.size_bytes)}, "
              f"{r.seconds:.1f} s)", soft_wrap=True)
    if r.quantized_base and not r.requantized_bits:
        out.print("The base was quantized: the merge was done in full precision and written dequantized.")
    if r.deviation:
        d = r.deviation
        out.print(f"Re-quantized to {r.requantized_bits}-bit: adapted weights moved by up to {d['max_abs']:.3g} "
                  f"(relative RMS {d['relative_rms']:.2%}) from the full-precision merge.", soft_wrap=True)
        out.print(f"Perplexity on {d['text']}: {d['perplexity_merged']:.4g} merged, {d['perplexity_requantized']:.4g} "
                  f"re-quantized; same greedy next token at {d['top1_agreement']:.1%} of positions", soft_wrap=True,
                  markup=False)


def show_export(r) -> None:
    what = {"hf": "Hugging Face checkpoint", "peft": "PEFT adapter", "gguf": f"GGUF file ({r.dtype})",
            "gguf-lora": "GGUF LoRA adapter"}[r.format]
    out.print(f"Exported a {what} -> {r.output} ({r.tensors} tensors, {human_bytes(r.size_bytes)}, {r.seconds:.1f} s)",
              soft_wrap=True, markup=False)
    if r.tensor_types:
        out.print("Tensor types: " + ", ".join(f"{k} {n}" for k, n in r.tensor_types.items()), soft_wrap=True,
                  markup=False)
    if r.base_gguf:
        out.print(f"Base model GGUF: {r.base_gguf}; Modelfile: FROM the base, ADAPTER the adapter", soft_wrap=True,
                  markup=False)
    if r.verify_perplexity:
        ppl = r.verify_perplexity
        cost = ppl[r.dtype] / ppl["f16"] - 1
        out.print(f"Verify with llama.cpp on {r.verify_text} ({r.verify_tokens} tokens): perplexity MLX "
                  f"{ppl['mlx']:.4g}, f16 GGUF {ppl['f16']:.4g}"
                  + (f", {r.dtype} {ppl[r.dtype]:.4g} ({cost:+.2%} vs f16, {human_bytes(r.size_bytes)} vs "
                     f"{human_bytes(r.reference_size_bytes)})" if r.dtype != "f16" else ""), soft_wrap=True,
                  markup=False)
        out.print("Same greedy next token: " + ", ".join(f"{k} {v:.1%}" for k, v in r.verify_top1.items()),
                  soft_wrap=True, markup=False)
    if r.restored:
        out.print("Restored from " + r.source + ": " + ", ".join(f"{k} ({n})" for k, n in sorted(r.restored.items())),
                  soft_wrap=True)
    if r.verified_max_diff is not None:
        verdict = "[green]PASS[/]" if r.verify_passed else "[red]FAIL[/]"
        out.print(f"Verify with transformers: {verdict} max |logit difference| {r.verified_max_diff:.2e} "
                  f"{'<=' if r.verify_passed else '>'} {r.verify_threshold:.2e} (float32 rounding; "
                  f"{r.verify_tokens} tokens of text, weights in {r.dtype}; the base model alone: "
                  f"{r.verify_base_max_diff:.2e})", soft_wrap=True)


def show_plan(p) -> None:
    """doctor --plan: one table per setup, a row per Mac size."""
    out.print(f"{p.model}: {p.parameters / 1e9:.2f}B parameters in the text model, {p.weights_gb:.1f} GiB of "
              "weights as released; estimates of a training step's peak, GiB", markup=False, soft_wrap=True)
    for setup in dict.fromkeys(r.setup for r in p.rows):
        t = Table(title=setup, title_justify="left")
        for col in ("Mac", "budget", "as is", "fits", "what makes it fit (--set)", "then", "batch x tokens"):
            t.add_column(col, justify="right" if col in ("budget", "as is", "then") else "left")
        for r in (r for r in p.rows if r.setup == setup):
            t.add_row(f"{r.mac_gb} GB", f"{r.budget_gb:.1f}", f"{r.estimate_gb:.1f}", "yes" if r.fits else "no",
                      "-" if r.fits else " ".join(r.switches),
                      "" if r.fits or r.fit_estimate_gb is None else f"{r.fit_estimate_gb:.1f}",
                      f"{r.batch} x {r.seq_len}" if r.batch else "")
        out.print(t)


def show_quickstart(r, command: str = "mlx-gemma-tune", activate: str | None = None) -> None:
    """The before / after answers, exact match, the outputs and the next commands (`command` as the
    user can type it; `activate`: the line that puts it on PATH, when it is not)."""
    for prompt, before, after, ref in zip(r.prompts, r.before, r.after, r.references):
        if out.is_terminal:
            t = Table(title=prompt, show_lines=True, expand=True)
            for col in ("before", "after", "expected"):
                t.add_column(col)
            t.add_row(before, after, ref)
            out.print(t)
        else:
            out.print(f"prompt: {prompt}\nbefore: {before}\nafter: {after}\nexpected: {ref}", markup=False,
                      soft_wrap=True)
    out.print(f"[bold]Held-out exact match[/] on {r.eval_rows} rows: before {r.accuracy_before:.0%}, "
              f"after {r.accuracy_after:.0%}", soft_wrap=True)
    out.print(f"Run: {r.run_dir}\nFused MLX model: {r.fused}\nHugging Face checkpoint: {r.hf}\n"
              f"PEFT adapter: {r.peft}", markup=False, soft_wrap=True)
    first = f"{activate}, then: " if activate else ""
    out.print(f"Next: {first}{command} chat {r.run_dir}  |  {command} generate {r.run_dir} --prompt \"...\" --compare",
              markup=False, soft_wrap=True)


def note(message: str) -> None:
    """One line on stderr, no markup (paths and URLs as they are)."""
    err.print(message, soft_wrap=True, markup=False, highlight=False)
