"""The command line itself: instant help, one-line errors, doctor."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
