"""The command line itself: instant help, one-line errors, doctor."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import assert_one_line_error, run_cli

HEAVY = ("mlx", "mlx_lm", "mlx_vlm", "transformers", "torch", "datasets", "rich")


def test_help_imports_nothing_heavy():
    """What makes `--help` slow is importing the ML stack; no command's help may (the wall-clock
    figure is a benchmark, benchmarks/cli_startup.py, not a test on a shared machine)."""
    code = f"""
import sys
from mlx_gemma_tune.cli import cli

def walk(group, path):
    yield path
    for name, sub in getattr(group, "commands", {{}}).items():
        yield from walk(sub, path + [name])

seen = []
for path in walk(cli, []):
    try:
        cli.main(path + ["--help"], prog_name="mlx-gemma-tune", standalone_mode=False)
    except SystemExit:
        pass
    seen.append(" ".join(path) or "(group)")
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print("|".join(seen))
print(heavy)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    helped, heavy = res.stdout.strip().splitlines()[-2:]
    assert {"(group)", "train", "export", "data check", "recipes list"} <= set(helped.split("|")), helped
    assert heavy == "[]", f"`--help` imported {heavy}"


def test_console_script_and_module_agree():
    exe = os.path.join(os.path.dirname(sys.executable), "mlx-gemma-tune")
    a = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    b = subprocess.run([sys.executable, "-m", "mlx_gemma_tune", "--version"], capture_output=True, text=True,
                       check=False)
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and "mlx-gemma-tune" in a.stdout


def test_unknown_command_is_one_line():
    assert_one_line_error(run_cli(["frobnicate"]), "No such command", code=2)


def test_doctor_reports_versions_device_and_blas():
    res = run_cli(["doctor", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    from importlib.metadata import version

    import mlx.core as mx

    assert rep["packages"]["mlx"] == version("mlx")
    assert rep["packages"]["mlx-lm"] == version("mlx-lm")
    assert rep["packages"]["transformers"] == version("transformers")
    assert rep["metal"] == bool(mx.metal.is_available())
    assert rep["memory_bytes"] and rep["memory_bytes"] > 1 << 30
    if sys.platform.startswith("linux"):
        assert rep["device"].startswith("CPU")
        assert rep["blas"]["gflops"] > 0 and rep["blas"]["libraries"]
        # A slow BLAS is reported as a problem with the fix in it.
        assert rep["blas"]["fast"] or any("libopenblas" in p for p in rep["problems"])
    names = {o["package"] for o in rep["optional"]}
    assert {"torch", "peft", "gguf"} <= names
    assert rep["hf_offline"] is True  # conftest sets HF_HUB_OFFLINE=1
    assert rep["distributed"]["size"] == 1 and rep["distributed"]["launched"] is False  # not under mlx.launch


def test_doctor_table():
    res = run_cli(["doctor"])
    assert res.exit_code == 0
    for word in ("Python", "mlx-lm", "transformers", "MLX device", "Memory", "world size 1"):
        assert word in res.stdout


def test_the_package_builds_quietly_with_its_recipes_and_examples(tmp_path):
    """setuptools ships the data folders (recipes, example datasets) without a warning per folder."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).parent.parent
    src = tmp_path / "src"
    shutil.copytree(root / "mlx_gemma_tune", src / "mlx_gemma_tune", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (root / name).exists():
            shutil.copy(root / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), "-v"], capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr[-2000:]
    noise = [x for x in (build.stdout + build.stderr).splitlines() if "absent from the `packages`" in x
             or "would be ignored" in x]
    assert noise == []
    [wheel] = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"mlx_gemma_tune/recipes/gemma4-e2b-lora.yaml", "mlx_gemma_tune/recipes/tasks/tool-calling.yaml",
            "mlx_gemma_tune/examples/tool_calling/train.jsonl", "mlx_gemma_tune/examples/tool_calling/tools.json",
            "mlx_gemma_tune/examples/README.md", "mlx_gemma_tune/calibration/sample.txt",
            "mlx_gemma_tune/configs/gemma-4-E4B-it.json", "mlx_gemma_tune/examples/extraction_preferences/test.jsonl",
            "mlx_gemma_tune/web/compare.html"} <= names


def test_compute_commands_use_openblas_when_installed_and_say_so_when_not(hf_model):
    """Linux: MLX's bundled reference BLAS is ~30x slower; a compute command restarts itself with
    OpenBLAS preloaded when it is installed, and otherwise says so in one line before it starts."""
    import json
    import os
    import subprocess
    import sys

    from mlx_gemma_tune import cpu_blas

    if cpu_blas.openblas_library() is None:
        pytest.skip("Debian's OpenBLAS is not installed here")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}

    def run(*args, **extra):
        return subprocess.run([sys.executable, "-m", "mlx_gemma_tune", *args], env=env | extra, capture_output=True,
                              text=True, timeout=300, check=False)

    fast = run("doctor", "--json")
    assert fast.returncode == 0, fast.stderr
    assert any("openblas" in lib for lib in json.loads(fast.stdout)["blas"]["libraries"])
    slow = run("generate", str(hf_model("gemma3_text")), "--prompt", "Hi", "--max-tokens", "1",
               MLX_GEMMA_TUNE_OPENBLAS="0")
    assert slow.returncode == 0, slow.stderr
    assert slow.stderr.splitlines()[0].startswith("note: MLX is using its slow reference BLAS")
    quiet = run("generate", str(hf_model("gemma3_text")), "--prompt", "Hi", "--max-tokens", "1")
    assert quiet.returncode == 0 and "reference BLAS" not in quiet.stderr


def test_the_next_commands_say_how_to_get_mlx_gemma_tune_on_path(monkeypatch, tmp_path):
    """After scripts/quickstart.sh, `mlx-gemma-tune` is in .venv/bin, not on PATH: the hint says so."""
    import shutil
    import sys
    from pathlib import Path

    from mlx_gemma_tune import cli

    bin_dir = Path(sys.executable).parent
    monkeypatch.setattr(shutil, "which", lambda name: None)
    command, activate = cli._how_to_run()
    assert command == "mlx-gemma-tune" and activate is not None and activate.startswith("source ")
    assert activate.endswith("activate") and (bin_dir / "activate").is_file()
    monkeypatch.setattr(shutil, "which", lambda name: str(bin_dir / name))
    assert cli._how_to_run() == ("mlx-gemma-tune", None)
