"""The peak-memory estimate against MLX's measured peak, and `doctor MODEL --recipe`."""

from __future__ import annotations

import itertools
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
from mlx_gemma_tune import checkpointing, data, lora, losses, memory, models, packing, train_step

path, batch, seq, ckpt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model, config = models.load_model(path)
mx.random.seed(0)
lora.apply(model, config, lora.LoraSettings(rank=8, alpha=16, dropout=0.0))
checkpointing.checkpoint_layers(model, ckpt)
rows = [data.Example(tokens=list(range(3, seq + 4)), mask=[True] * (seq + 1), source="r") for _ in range(batch)]
step = train_step.make_step(model, optim.AdamW(learning_rate=1e-4), compile=False)
mx.clear_cache()
mx.reset_peak_memory()
for _ in range(2):
    step([packing.batch_arrays([[r] for r in rows])])
n = lora.trainable_parameters(model)
est = memory.estimate(config, weight_bytes=memory.model_bytes(model) - 4 * n, adapter_parameters=n,
                      batch=batch, seq_len=seq, loss_chunk=losses.DEFAULT_CHUNK, grad_checkpoint=ckpt)
print(json.dumps({"measured": mx.get_peak_memory() / 2**30, "estimate": est.total_gb}))
"""


@pytest.mark.parametrize("batch,seq,ckpt", [(2, 256, 0), (4, 128, 0), (4, 256, 2)])
def test_estimate_is_within_15_percent_of_the_measured_peak(batch, seq, ckpt, hf_model):
    res = subprocess.run([sys.executable, "-c", _MEASURE, str(hf_model("gemma3_text")), str(batch), str(seq), str(ckpt)],
                         capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert abs(got["estimate"] / got["measured"] - 1) <= 0.15, got


def test_doctor_prints_the_memory_breakdown_and_warns_over_budget(hf_model):
    res = run_cli(["doctor", str(hf_model("gemma4_edge")), "--recipe", "gemma4-e2b-lora", "--json"])
    assert res.exit_code == 0, res.output
    est = json.loads(res.stdout)
    assert est["batch"] == 4 and est["seq_len"] == 1024 and est["loss_chunk"] == 192
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


def test_auto_checkpoints_no_layer_when_the_budget_allows_and_the_fewest_that_fit_otherwise(hf_model, tmp_path,
                                                                                               monkeypatch):
    """train.grad_checkpoint: auto (the default): none on a roomy machine; on a tight one the smallest number
    of layers whose estimate fits, and the run checkpoints exactly those (the first ones)."""
    from mlx_gemma_tune import memory, prepare, trainer
    from mlx_gemma_tune.train_state import TrainCallback

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Q " * 60 + f"{i}?", "completion": "A " * 60}) + "\n"
                            for i in range(4)))

    def run(name, budget):
        monkeypatch.setattr(memory, "budget_bytes", lambda: budget)
        p = prepare.prepare_run(model=str(hf_model("gemma3_text")), data=str(data), out=str(tmp_path / name),
                                sets=("train.iters=1", "train.batch_size=4", "data.valid_fraction=0"))
        starts = []

        class Record(TrainCallback):
            def on_start(self, start):
                starts.append(start)

        trainer.run(p, callback=Record())
        return p, starts[0]

    p, roomy = run("roomy", 2**40)
    assert p.recipe.train.grad_checkpoint == "auto" and roomy.checkpointed_layers == 0 and not roomy.grad_checkpoint
    by_count = [memory.estimate_for_run(p, grad_checkpoint=n).total_gb for n in range(5)]
    assert all(a > b for a, b in itertools.pairwise(by_count))  # each checkpointed layer saves memory
    budget = (by_count[1] + by_count[2]) / 2  # 2 layers fit, 1 does not
    p, tight = run("tight", int(budget * 2**30))
    assert tight.checkpointed_layers == 2 and tight.layers == 4
    assert tight.memory_estimate_gb == pytest.approx(by_count[2])
    assert [type(layer).__name__.startswith("Checkpointed") for layer in p.model.layers] == [True, True, False, False]


def test_grad_checkpoint_takes_auto_true_false_or_a_layer_count(hf_model, tmp_path):
    from helpers import assert_one_line_error
    from mlx_gemma_tune import recipe

    for value in ("auto", True, False, 0, 3):
        sets = {"model.path": "m", "data.path": "d", "train.grad_checkpoint": value}
        assert recipe.build(overrides=sets).train.grad_checkpoint == value
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q?", "completion": "A."}) + "\n")
    for bad in ("sometimes", "-1"):
        res = run_cli(["train", "--model", hf_model("gemma3_text"), "--data", data, "-o", tmp_path / "run",
                       "--set", f"train.grad_checkpoint={bad}"])
        assert_one_line_error(res, "train.grad_checkpoint", "expected true, false, a number of layers or auto")
        assert not (tmp_path / "run").exists()
