"""CLI commands about recipes and datasets: `recipes list | show | copy`, `data check`.

cli.py adds COMMANDS to its `cli` group; same rules as there: parse, call one library function, show.
"""

from __future__ import annotations

from pathlib import Path

import click

from mlx_gemma_tune.recipe import default as recipe_default


@click.group()
def recipes():
    """List, show and copy the shipped training recipes."""


@recipes.command("list")
def recipes_list():
    """The shipped recipes."""
    from mlx_gemma_tune import recipe as r

    for name, about in r.list_recipes():
        click.echo(f"{name:28s} {about}")


@recipes.command("show")
@click.argument("name")
def recipes_show(name):
    """Print a recipe (a shipped name or a path)."""
    from mlx_gemma_tune import recipe as r

    click.echo(r.find_recipe(name).read_text(), nl=False)


@recipes.command("copy")
@click.argument("name")
@click.argument("dest", type=click.Path())
@click.option("--force", is_flag=True, help="Overwrite DEST if it exists.")
def recipes_copy(name, dest, force):
    """Copy a shipped recipe to DEST to edit it."""

    from mlx_gemma_tune import fsio
    from mlx_gemma_tune import recipe as r
    from mlx_gemma_tune.errors import OutputError

    src = r.find_recipe(name)
    target = Path(dest)
    if target.is_dir():
        target = target / src.name
    if target.exists() and not force:
        raise OutputError("already exists", where=str(target), hint="pass --force to overwrite it")
    fsio.atomic_write_text(target, src.read_text())
    click.echo(f"Copied {src.stem} to {target}")


@click.group()
def data():
    """Inspect datasets before training."""


@data.command("check")
@click.argument("path")
@click.option("--model", default=None, type=click.Path(file_okay=False),
              help="A model directory whose tokenizer and chat template measure the rows in tokens.")
@click.option("--max-seq-length", type=click.IntRange(min=1), default=recipe_default("data.max_seq_length"),
              show_default=True, help="Count rows longer than this many tokens (needs --model).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def data_check(path, model, max_seq_length, as_json):
    """Report rows, formats, length stats, overlong, duplicate and empty rows of PATH."""
    from mlx_gemma_tune import ui
    from mlx_gemma_tune.data_check import check

    with ui.status("Checking the dataset"):
        report = check(path, model, max_seq_length)
    if as_json:
        ui.print_json(report.to_dict())
    else:
        ui.show_data_report(report)
    if report.refused:
        from mlx_gemma_tune.data import REFUSED_HINT
        from mlx_gemma_tune.errors import InputError

        raise InputError(f"{len(report.refused)} row(s) cannot be rendered by the model's chat template "
                         f"(listed above), e.g. {report.refused[0]}", where=str(path), hint=REFUSED_HINT)


COMMANDS = (recipes, data)
