"""Every file and directory the product writes has the mode a plain open() / mkdir() gives under the
user's umask (staging through tempfile's 0600 / 0700 names must not leak into the outputs)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from helpers import run_cli


@pytest.fixture
def umask():
    old = os.umask(0o022)

    def use(mask: int) -> None:
        os.umask(mask)

    yield use
    os.umask(old)


def _modes(root: Path) -> dict[str, str]:
    """{path: octal mode} of root and everything under it that is not what umask 022 gives."""
    bad = {}
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        want = 0o755 if p.is_dir() else 0o644
        have = stat.S_IMODE(p.stat().st_mode)
        if have != want:
            bad[str(p)] = oct(have)
    return bad


def test_staged_directories_and_atomic_files_follow_the_umask(umask, tmp_path):
    from mlx_gemma_tune import fsio

    for mask, d_mode, f_mode in ((0o022, 0o755, 0o644), (0o027, 0o750, 0o640)):
        umask(mask)
        out = tmp_path / f"out-{mask:o}"
        with fsio.staged_dir(out) as tmp:
            (tmp / "sub").mkdir()
            fsio.atomic_write_text(tmp / "sub" / "a.json", "{}")
        fsio.atomic_write_text(out / "b.txt", "x")
        assert stat.S_IMODE(out.stat().st_mode) == d_mode
        assert stat.S_IMODE((out / "sub").stat().st_mode) == d_mode
        assert stat.S_IMODE((out / "sub" / "a.json").stat().st_mode) == f_mode
        assert stat.S_IMODE((out / "b.txt").stat().st_mode) == f_mode


def test_every_output_is_readable_by_other_accounts_under_umask_022(umask, hf_model, tmp_path):
    """Report 6: convert / export --format hf made drwx------ directories and --ollama -rw------- files."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f"A{i}."}) + "\n" for i in range(4)))
    model = hf_model("gemma3_text")
    outputs = {
        "convert": ["convert", model, "-o", tmp_path / "mlx"],
        "train": ["train", "--model", model, "--data", data, "-o", tmp_path / "run", "--set", "train.iters=2",
                  "--set", "train.save_every=1", "--set", "data.valid_fraction=0", "--set", "lora.rank=4"],
        "fuse": ["fuse", tmp_path / "run", "-o", tmp_path / "fused"],
        "hf": ["export", tmp_path / "run", "--format", "hf", "-o", tmp_path / "hf"],
        "peft": ["export", tmp_path / "run", "--format", "peft", "-o", tmp_path / "peft"],
        "gguf": ["export", tmp_path / "run", "--format", "gguf", "-o", tmp_path / "gguf" / "m.gguf", "--ollama"],
    }
    (tmp_path / "gguf").mkdir()
    for name, args in outputs.items():
        res = run_cli(args)
        assert res.exit_code == 0, (name, res.output)
    for out in ("mlx", "run", "fused", "hf", "peft", "gguf"):
        assert _modes(tmp_path / out) == {}, out
    assert (tmp_path / "gguf" / "Modelfile").is_file() and (tmp_path / "run" / "checkpoints").is_dir()


def test_a_replaced_file_keeps_its_own_mode(umask, tmp_path):
    from mlx_gemma_tune import fsio

    private = tmp_path / "chat.jsonl"
    private.write_text("old\n")
    private.chmod(0o600)
    fsio.atomic_write_text(private, "new\n")
    assert private.read_text() == "new\n" and stat.S_IMODE(private.stat().st_mode) == 0o600
