"""Everything the user sees. The only module that imports rich.

Library functions return values and report progress through callbacks; the
functions here turn those into spinners, tables and JSON.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Callable, Iterator

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
              f"({r.tokens:,} target tokens in {r.rows:,} rows)")
    if r.truncated:
        err.print(f"[yellow]warning:[/] {r.truncated} rows were longer than --max-seq-length and were truncated")


def print_json(obj) -> None:
    # Plain stdout, no Rich markup or wrapping, so scripts can parse it.
    import click

    click.echo(json.dumps(obj, indent=2))


def show_convert(r) -> None:
    t = Table(title="Converted", show_header=False, title_justify="left", box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("Family", f"{r.family} — {r.variant} ({r.model_type})")
    t.add_row("Source", r.source)
    t.add_row("Output", r.output)
    t.add_row("Parameters", f"{human_count(r.parameters)} (text model)")
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
    for o in rep.optional:
        state = o["installed"] or f"[dim]missing[/] — {o['install']}"
        t.add_row(o["package"], f"{state} ({o['enables']})")
    out.print(t)
    for p in rep.problems:
        err.print(f"[yellow]warning:[/] {p}")
