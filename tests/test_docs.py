"""The README stays true: the recipe reference is the schema's, and every command shown exists."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import run_cli

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_recipe_reference_matches_schema():
    from mlx_gemma_tune.recipe import reference_table

    assert reference_table() in README


def test_every_command_in_the_readme_exists():
    shown = set(re.findall(r"mlx-gemma-tune ([a-z]+)", README))
    res = run_cli(["--help"])
    commands = set(re.findall(r"^  ([a-z]+)\s", res.stdout, flags=re.MULTILINE))
    assert shown <= commands, f"the README shows commands that do not exist: {shown - commands}"
    assert commands <= shown, f"commands the README never shows: {commands - shown}"
