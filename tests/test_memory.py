"""The peak-memory estimate against MLX's measured peak, and `doctor MODEL --recipe`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import run_cli

# Run in a fresh process: in the test process, arrays that earlier tests (whichever the worker ran
# before, in whatever order) left alive or free mid-step would move the measured peak.
_MEASURE = """
import json, sys
import mlx.core as mx
import mlx.optimizers as optim
from mlx_gemma_tune import data, lora, losses, memory, models, packing, train_step

path, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, config = models.load_model(path)
mx.random.seed(0)
lora.apply(model, config, lora.LoraSettings(rank=8, alpha=16, dropout=0.0))
rows = [data.Example(tokens=list(range(3, seq + 4)), mask=[True] * (seq + 1), source="r") for _ in range(batch)]
step = train_step.make_step(model, optim.AdamW(learning_rate=1e-4), compile=False)
mx.clear_cache()
mx.reset_peak_memory()
for _ in range(2):
    step([packing.batch_arrays([[r] for r in rows])])
n = lora.trainable_parameters(model)
est = memory.estimate(config, weight_bytes=memory.model_bytes(model) - 4 * n, adapter_parameters=n,
                      batch=batch, seq_len=seq, loss_chunk=losses.DEFAULT_CHUNK, grad_checkpoint=False)
print(json.dumps({"measured": mx.get_peak_memory() / 2**30, "estimate": est.total_gb}))
"""


@pytest.mark.parametrize("batch,seq", [(2, 256), (4, 128)])
def test_estimate_is_within_15_percent_of_the_measured_peak(batch, seq, hf_model):
    res = subprocess.run([sys.executable, "-c", _MEASURE, str(hf_model("gemma3_text")), str(batch), str(seq)],
                         capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert abs(got["estimate"] / got["measured"] - 1) <= 0.15, got


def test_doctor_prints_the_memory_breakdown_and_warns_over_budget(hf_model):
    res = run_cli(["doctor", str(hf_model("gemma4_edge")), "--recipe", "gemma4-e2b-lora", "--json"])
    assert res.exit_code == 0, res.output
    est = json.loads(res.stdout)
    assert est["batch"] == 4 and est["seq_len"] == 1024 and est["loss_chunk"] == 256
    parts = est["weights_gb"] + est["adapter_gb"] + est["activations_gb"] + est["loss_gb"]
    assert est["total_gb"] == pytest.approx(parts) and est["activations_gb"] > 0
    res = run_cli(["doctor", str(hf_model("gemma4_edge")), "--recipe", "gemma4-e2b-lora",
                   "--set", "train.batch_size=4096", "--set", "data.max_seq_length=65536"])
    assert res.exit_code == 0, res.output
    assert "Activations" in res.stdout and "over budget" in res.stderr
    res = run_cli(["doctor", "--recipe", "gemma4-e2b-lora"])
    assert res.exit_code == 2 and "needs both MODEL and --recipe" in res.stderr


def test_an_over_budget_run_is_refused_in_one_line_with_nothing_written(hf_model, tmp_path, monkeypatch):
    """The guard: the estimate (with gradient checkpointing, allowed by default) over the machine's budget
    stops the run before anything is written; train.memory_guard=false starts it anyway."""
    from helpers import assert_one_line_error
    from mlx_gemma_tune import memory

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": "A."}) + "\n" for i in range(8)))
    monkeypatch.setattr(memory, "budget_bytes", lambda: 2**20)  # a 1 MiB machine
    args = ["train", "--model", hf_model("gemma3_text"), "--data", data, "--set", "train.iters=1"]
    res = run_cli([*args, "-o", tmp_path / "run"])
    line = assert_one_line_error(res, "memory: the estimated peak memory", "with gradient checkpointing",
                                 "exceeds this machine's budget of 0.0 GiB", "--quantize 4", "train.memory_guard=false")
    assert "GiB by" in line and not (tmp_path / "run").exists()
    anyway = run_cli([*args, "-o", tmp_path / "anyway", "--set", "train.memory_guard=false"])
    assert anyway.exit_code == 0, anyway.output
