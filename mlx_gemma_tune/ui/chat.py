"""What `chat` and `generate` show: a streamed reply with its thought and tool calls apart, the
footer, notes and errors of the chat loop, base and tuned answers side by side. Part of the ui
package, the only place that imports rich."""

from __future__ import annotations

from rich.table import Table

from mlx_gemma_tune import ui


def stream_reply(parts, label: str = "", fold_thought: bool = False) -> str:
    """Show a reply as it streams, from ("thought" | "answer", text) and ("tool_call", call) pieces
    (thinking.thought_and_answer, tools.calls_apart): on a terminal the thought dim (with
    fold_thought, folded to one line once the reply is complete: chat's /thought unfolds it), the
    answer as live Markdown and each call on its own cyan line; otherwise plain lines, the thought on
    its own `thinking:` line and each call on a `tool call:` line. Returns the answer's text."""
    import click

    from mlx_gemma_tune.tools import describe

    thought, text, calls = "", "", []
    if ui.out.is_terminal:
        from rich.console import Group
        from rich.live import Live
        from rich.markdown import Markdown
        from rich.text import Text

        with Live(Markdown(""), console=ui.out, refresh_per_second=12, vertical_overflow="visible") as live:
            for kind, piece in parts:
                if kind == "thought":
                    thought += piece
                elif kind == "tool_call":
                    calls.append(Text(f"→ tool call: {describe(piece)}", style="bold cyan"))
                else:
                    text += piece
                shown = ([Text(thought, style="dim italic")] if thought else []) + [Markdown(text)] + calls
                live.update(Group(*shown))
            if thought and fold_thought:
                folded = Text(f"▸ thought, {len(thought.split())} words (/thought shows it)", style="dim italic")
                live.update(Group(folded, Markdown(text), *calls))
        return text
    kind_now = None
    for kind, piece in parts:
        if kind != kind_now or kind == "tool_call":
            if kind_now is not None:
                click.echo()
            heads = {"thought": "thinking: ", "tool_call": "tool call: "}
            click.echo(heads.get(kind, f"{label}: " if label else ""), nl=False)
            kind_now = kind
        if kind == "answer":
            text += piece
        click.echo(describe(piece) if kind == "tool_call" else piece, nl=False)
    if kind_now is None and label:
        click.echo(f"{label}: ", nl=False)
    click.echo()
    return text


def with_calls(answer: str | None, calls: list[dict] | None) -> str | None:
    """An answer with its tool calls written after it, one `tool call: name(args)` line each."""
    from mlx_gemma_tune.tools import describe

    if not calls:
        return answer
    lines = [f"tool call: {describe(c)}" for c in calls]
    return "\n".join(([answer] if answer else []) + lines)


def chat_footer(stats) -> None:
    ui.err.print(f"[dim]{stats.tokens_per_sec:.1f} tok/s · prompt {stats.prompt_tokens} tokens · "
              f"{stats.generated_tokens} generated · peak {stats.peak_memory_gb:.2f} GB[/]", soft_wrap=True)


def chat_note(message: str) -> None:
    ui.out.print(f"[cyan]{message}[/]", soft_wrap=True, markup=True, highlight=False)


def chat_error(message: str) -> None:
    ui.err.print(f"[red]{message}[/]", soft_wrap=True)


def show_compare(prompt: str, base: str, tuned: str) -> None:
    """Base and tuned answers side by side (stacked when the output is not a terminal)."""
    if ui.out.is_terminal:
        t = Table(title=prompt, show_lines=True, expand=True)
        t.add_column("base")
        t.add_column("tuned")
        t.add_row(base, tuned)
        ui.out.print(t)
    else:
        ui.out.print(f"prompt: {prompt}\nbase: {base}\ntuned: {tuned}", soft_wrap=True, markup=False)
