"""Crash safety: a run killed anywhere resumes to the same result, leaves no broken file, and a full
disk or Ctrl-C stops it with a checkpoint to continue from."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPEATED_RTOL, assert_one_line_error, assert_same_training, initial_adapter, run_cli

ROWS = [{"prompt": f"Question {i}: what comes after {i}?", "completion": f"{i + 1}."} for i in range(24)]
SETS = ["train.iters=40", "train.batch_size=2", "train.report_every=1", "train.save_every=3",
        "train.eval_every=100000", "train.keep_checkpoints=2", "data.valid_fraction=0", "lora.rank=4",
        "lora.dropout=0.1", "train.lr=1e-3"]


def _args(model: Path, data: Path, out: Path) -> list[str]:
    args = ["train", "--model", str(model), "--data", str(data), "-o", str(out)]
    for s in SETS:
        args += ["--set", s]
    return args


def _steps_logged(run: Path) -> int:
    try:
        return sum(1 for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line)
    except FileNotFoundError:
        return 0


def _partial_checkpoint(run: Path) -> bool:
    root = run / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".step-") for p in root.iterdir())


def _launch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlx_gemma_tune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, ready, sig=signal.SIGKILL, delay: float = 0.0, timeout: float = 240) -> bool:
    """Send `sig` once ready() holds (after `delay` s); False if the process ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the training process never reached the kill point"
        time.sleep(0.0005)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(sig)
    return True


def assert_no_broken_file(run: Path) -> None:
    """Every file of the run (leftovers of interrupted writes aside) is complete and readable."""
    import mlx.core as mx
    import yaml
    from PIL import Image

    from mlx_gemma_tune import fsio, hf_checkpoint

    for p in run.rglob("*"):
        if not p.is_file() or any(fsio.is_leftover(a) for a in [p, *p.parents]):
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            text = p.read_text()
            assert text == "" or text.endswith("\n"), f"{p}: a half-written line"
            [json.loads(line) for line in text.splitlines()]
        elif p.suffix == ".safetensors":
            hf_checkpoint.inspect_weights(p, hash_it=False)
            mx.eval(list(mx.load(str(p)).values()))
        elif p.suffix == ".yaml":
            yaml.safe_load(p.read_text())
        elif p.suffix == ".png":
            Image.open(p).verify()
        else:
            raise AssertionError(f"unexpected file {p}")
    for ckpt in (run / "checkpoints").glob("step-*"):  # a visible checkpoint is a complete one
        assert {f.name for f in ckpt.iterdir()} == {"adapters.safetensors", "adapter_config.json",
                                                     "optimizer.safetensors", "state.json"}, ckpt


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == list(range(1, len(steps) + 1)), "every step logged exactly once, in order"
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(hf_model, tmp_path):
    from mlx_gemma_tune import fsio

    model = hf_model("gemma3_text")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    reference = tmp_path / "reference"
    res = run_cli(_args(model, data, reference))
    assert res.exit_code == 0, res.output

    run = tmp_path / "killed"
    rng = random.Random(20261123)
    # Kill points: (after this many logged steps, extra delay) or "mid-checkpoint" (a staged step dir exists).
    points = [(1, 0.0), "mid-checkpoint", (rng.randint(5, 12), rng.uniform(0, 0.05)), "mid-checkpoint",
              (rng.randint(14, 25), rng.uniform(0, 0.05)), (rng.randint(26, 38), rng.uniform(0, 0.05))]
    landed = []
    for i, point in enumerate(points):
        proc = _launch(_args(model, data, run) if i == 0 else ["train", "--resume", str(run)])
        start = _steps_logged(run)
        if point == "mid-checkpoint":
            hit = _kill_when(proc, lambda: _partial_checkpoint(run))
        else:
            n, delay = point
            hit = _kill_when(proc, lambda n=n, start=start: _steps_logged(run) >= max(n, start + 1), delay=delay)
        proc.wait(timeout=120)
        assert hit and proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr.read())
        landed.append((point, _steps_logged(run)))
        assert_no_broken_file(run)
    assert len(landed) >= 5

    # Ctrl-C (a real SIGINT) two steps into the next resume: a checkpoint there and the command to continue.
    proc = _launch(["train", "--resume", str(run)])
    start = _steps_logged(run)
    assert start < 38, landed
    assert _kill_when(proc, lambda: _steps_logged(run) >= start + 2, sig=signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"mlx-gemma-tune train --resume {run}" in err
    stopped = json.loads((run / "summary.json").read_text())["steps"]
    assert (run / "checkpoints" / f"step-{stopped:08d}").is_dir() and stopped < 40
    assert_no_broken_file(run)
    final = _launch(["train", "--resume", str(run)])
    _, err = final.communicate(timeout=240)
    assert final.returncode == 0, err

    assert_no_broken_file(run)
    assert not [p for p in run.rglob(".*") if fsio.is_leftover(p)], "leftovers of killed writes were cleared"
    assert _losses(run).keys() == _losses(reference).keys() == set(range(1, 41))
    init = initial_adapter(model=str(model), data=str(data), out=str(tmp_path / "init"), sets=SETS)
    assert_same_training(run, reference, init, REPEATED_RTOL)
    assert json.loads((run / "summary.json").read_text())["steps"] == 40


def _fill_disk_at_checkpoint(monkeypatch, after: int):
    """mx.save_safetensors fails like MLX does on a full disk, from the `after`+1-th checkpoint on."""
    import mlx.core as mx

    from mlx_gemma_tune import rundir

    real_write, calls = rundir.write_checkpoint, {"n": 0}

    def write_checkpoint(*a, **k):
        calls["n"] += 1
        if calls["n"] > after:
            def full(*_a, **_k):
                raise RuntimeError("[write] Unable to write 1048576 bytes to file.")
            monkeypatch.setattr(mx, "save_safetensors", full)
        return real_write(*a, **k)

    monkeypatch.setattr(rundir, "write_checkpoint", write_checkpoint)


def test_disk_full_keeps_the_previous_checkpoint(hf_model, tmp_path, monkeypatch):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run = tmp_path / "run"
    _fill_disk_at_checkpoint(monkeypatch, after=1)
    res = run_cli(_args(hf_model("gemma3_text"), data, run))
    line = assert_one_line_error(res, "no space left", "step 6", "step-00000003", f"train --resume {run}")
    assert "internal error" not in line
    assert_no_broken_file(run)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000003"]  # the failed one left nothing
    monkeypatch.undo()  # space freed: the run continues from step 3
    res = run_cli(["train", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 40


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_on_a_real_tiny_filesystem(hf_model, tmp_path):
    """convert onto a 256 KiB tmpfs: a clear line, the earlier output untouched, no partial directory."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "out").mkdir()
        (mnt / "out" / "keep.txt").write_text("the previous output")
        res = run_cli(["convert", hf_model("gemma3_text"), "-o", mnt / "out", "--force"])
        assert_one_line_error(res, "no space left", str(mnt / "out"))
        assert [p.name for p in mnt.iterdir()] == ["out"]
        assert (mnt / "out" / "keep.txt").read_text() == "the previous output"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
