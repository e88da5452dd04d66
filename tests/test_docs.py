"""The README stays true: the recipe reference is the schema's, and every command shown exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers import run_cli

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_recipe_reference_matches_schema():
    from mlx_gemma_tune.recipe import reference_table

    assert reference_table() in README


def test_mac_size_plan_matches_the_shipped_configs():
    from mlx_gemma_tune.plan import readme_table

    assert readme_table() in README, "run scripts/update_readme.py"


def test_every_command_in_the_readme_exists():
    shown = set(re.findall(r"mlx-gemma-tune ([a-z]+)", README))
    res = run_cli(["--help"])
    commands = set(re.findall(r"^  ([a-z]+)\s", res.stdout, flags=re.MULTILINE))
    assert shown <= commands, f"the README shows commands that do not exist: {shown - commands}"
    assert commands <= shown, f"commands the README never shows: {commands - shown}"


def test_the_python_api_example_runs(hf_model, tmp_path):
    """The README's Python API example, on a tiny Gemma 4 fixture and a few rows of the extraction task."""
    code = re.search(r"## Python API.*?```python\n(.*?)```", README, re.DOTALL).group(1)
    examples = Path(__file__).parent.parent / "examples" / "extraction"
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 8), ("valid", 4), ("test", 4)):
        lines = (examples / f"{split}.jsonl").read_text().splitlines()[:n]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    for line, value in (('MODEL = "google/gemma-4-E2B-it"', repr(str(hf_model("gemma4_edge")))),
                        ('DATA = "examples/extraction"', repr(str(data))), ("STEPS = 60", "2")):
        assert line in code
        code = code.replace(line, f"{line.split(' = ')[0]} = {value}")
    (tmp_path / "example.py").write_text(code)
    run = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = run.stdout.splitlines()  # the two replies of a random model may hold newlines
    assert printed[0].split()[0] == "8"  # lora.rank from the override
    assert printed[1].startswith("{'train': 8, 'valid': 4, 'test': 4}") and printed[1].endswith("[]")
    assert printed[2].startswith("2 ")  # steps trained
    assert printed[-1].split()[0] == "exports/api-peft" and int(printed[-1].split()[1]) > 0  # tensors written
    assert (tmp_path / "runs" / "api" / "adapters.safetensors").is_file()
    assert (tmp_path / "exports" / "api-peft" / "adapter_config.json").is_file()


def test_the_readme_counts_the_bad_input_cases():
    import yaml

    cases = yaml.safe_load((Path(__file__).parent / "bad_inputs" / "cases.yaml").read_text())
    assert f"lists {len(cases)} broken inputs" in README
