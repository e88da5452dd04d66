"""`train --distributed`: two local ranks under mlx.launch (ring backend on 127.0.0.1) train the same
adapter as one process over the same global batches, only rank 0 writes, and Ctrl-C + --resume
continue exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REORDERED_RTOL, assert_same_training, initial_adapter, run_cli

ROWS = [{"prompt": f"Question {i}: " + "why " * (i % 7) + "?", "completion": f"Answer {i}" + "!" * (i % 5)}
        for i in range(22)]
SETS = ["train.iters=24", "train.batch_size=4", "train.report_every=1", "train.save_every=4", "train.eval_every=6",
        "data.valid_fraction=0.2", "lora.rank=4", "lora.dropout=0.0", "train.lr=1e-3"]

# Installed in both ranks (sitecustomize on PYTHONPATH): logs the pid and every file the process
# opens for writing, renames, creates or deletes (mx.save_safetensors writes a temporary file
# that fsio renames into place, so MLX's own writes show up as renames).
WRITE_LOG = r'''
import os, sys
if os.environ.get("MGT_WRITE_LOG") and "MLX_RANK" in os.environ:
    _log = open(os.path.join(os.environ["MGT_WRITE_LOG"], "rank%s.log" % os.environ["MLX_RANK"]), "a", buffering=1)
    _log.write("pid %d\n" % os.getpid())
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not isinstance(path, (str, bytes, os.PathLike)):
                return
            if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE):
                _log.write("open %s\n" % os.fsdecode(path))
        elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree",
                       "os.truncate", "os.symlink"):
            _log.write("%s %s\n" % (event, os.fsdecode(args[0]) if isinstance(args[0], (str, bytes)) else args[0]))
    sys.addaudithook(_hook)
'''


@pytest.fixture(scope="module")
def setup(hf_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(WRITE_LOG)
    reference = root / "single"
    res = run_cli(_train_args(hf_model("gemma3_text"), data, reference))
    assert res.exit_code == 0, res.output
    init = initial_adapter(model=str(hf_model("gemma3_text")), data=str(data), out=str(root / "init"), sets=SETS)
    return root, data, site, reference, hf_model("gemma3_text"), init


def _train_args(model, data, out) -> list:
    return ["train", "--model", model, "--data", data, "-o", out] + [a for s in SETS for a in ("--set", s)]


def _launch(setup, args: list, logs: Path) -> subprocess.Popen:
    root, _, site, _, _, _ = setup
    logs.mkdir(exist_ok=True)
    env = os.environ | {"MGT_WRITE_LOG": str(logs), "PYTHONPATH": os.pathsep.join([str(site), os.environ.get(
        "PYTHONPATH", "")])}
    launch = Path(sys.executable).parent / "mlx.launch"
    cmd = [str(launch), "--backend", "ring", "--hosts", "127.0.0.1,127.0.0.1", "--",
           sys.executable, "-m", "mlx_gemma_tune", *map(str, args)]
    return subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The launch's output once it ends; on a timeout every rank is killed before the test fails."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"the launch did not finish in {timeout} s: {err[-2000:]}") from None


def _written(logs: Path, rank: int, under: list[Path]) -> list[str]:
    lines = (logs / f"rank{rank}.log").read_text().splitlines()
    return [line for line in lines if not line.startswith("pid ")
            and any(line.split(" ", 1)[1].startswith(str(u)) for u in under)]


def test_two_ranks_train_the_single_process_adapter_ctrl_c_stops_both_and_only_rank_0_writes(setup):
    """One distributed run, interrupted by Ctrl-C on rank 0 and resumed, against one process.

    (One run covers both halves: an uninterrupted 2-rank run takes the same code path as the steps
    before the interrupt and the steps after the resume.)"""
    root, data, _, reference, model, init = setup
    run, logs, resume_logs = root / "interrupted", root / "logs-int", root / "logs-resume"
    cache = Path(os.environ["MLX_GEMMA_TUNE_CACHE"])
    proc = _launch(setup, _train_args(model, data, run) + ["--distributed"], logs)
    deadline = time.monotonic() + 240
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count('"train"') >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.001)
    rank0 = int((logs / "rank0.log").read_text().splitlines()[0].split()[1])
    os.kill(rank0, signal.SIGINT)  # Ctrl-C reaching one process only
    _, err = _finish(proc, 240)  # (mlx.launch exits 0 whatever its ranks return: no exit code to check)
    assert f"mlx-gemma-tune train --resume {run}" in err
    stopped = json.loads((run / "summary.json").read_text())["steps"]
    assert 3 <= stopped < 24 and (run / "checkpoints" / f"step-{stopped:08d}").is_dir()

    resumed = _launch(setup, ["train", "--resume", run, "--distributed"], resume_logs)
    out, err = _finish(resumed, 300)
    assert resumed.returncode == 0, err
    # the same records, losses, gradient norms and adapter as one process, up to summation order
    assert_same_training(run, reference, init, REORDERED_RTOL)
    summary, single = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert summary["steps"] == 24 and summary["best_step"] == single["best_step"]
    # rank 0 wrote the run (the hook sees it); rank 1 wrote nothing there nor in the model cache
    for launch in (logs, resume_logs):
        assert any("adapters.safetensors" in line for line in _written(launch, 0, [run]))
        assert _written(launch, 1, [run, cache, root]) == []
    assert out.count("Run directory") == 1  # one summary, from rank 0


def test_distributed_outside_mlx_launch_is_one_clear_error(hf_model, tmp_path):
    res = run_cli(["train", "--model", hf_model("gemma3_text"), "--data", tmp_path / "d.jsonl", "-o", tmp_path / "r",
                   "--distributed"])
    assert res.exit_code == 1
    assert "mlx.launch" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r").exists()


def test_doctor_reports_the_world_size_under_mlx_launch(setup):
    proc = _launch(setup, ["doctor", "--json"], setup[0] / "logs-doctor")
    out, err = _finish(proc, 120)
    assert proc.returncode == 0, err
    worlds = sorted((r["distributed"]["rank"], r["distributed"]["size"])
                    for r in json.loads("[" + out.replace("}\n{", "},{") + "]"))
    assert worlds == [(0, 2), (1, 2)]


def test_two_ranks_train_the_single_process_dpo_adapter(setup, tmp_path):
    """DPO under mlx.launch: each rank scores its shard of every global batch of pairs against the
    reference log-probabilities all ranks computed alike; the adapter equals one process's."""
    _, _, _, _, model, _ = setup
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Answer {i}" + "!" * (i % 3),
                                         "rejected": "No " * (1 + i % 4)}) + "\n" for i in range(20)))
    sets = ["train.objective=dpo", "train.iters=6", "train.batch_size=4", "train.report_every=1", "train.eval_every=3",
            "data.valid_fraction=0.2", "lora.rank=4", "lora.dropout=0.0", "train.lr=1e-4"]
    args = ["train", "--model", model, "--data", pairs] + [a for s in sets for a in ("--set", s)]
    single = tmp_path / "single"
    assert run_cli(args + ["-o", single]).exit_code == 0
    init = initial_adapter(model=str(model), data=str(pairs), out=str(tmp_path / "init"), sets=sets)
    proc = _launch(setup, args + ["-o", tmp_path / "dist", "--distributed"], tmp_path / "logs")
    _, err = _finish(proc, 300)
    assert proc.returncode == 0 and (tmp_path / "dist" / "summary.json").is_file(), err
    assert_same_training(tmp_path / "dist", single, init, REORDERED_RTOL)
    records = [json.loads(x) for x in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward_margin" in r for r in records if r["type"] == "train")
