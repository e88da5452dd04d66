"""Shared test helpers: drive the CLI and check the rules every error must follow."""

from __future__ import annotations

import hashlib
from pathlib import Path

from click.testing import CliRunner

from mlx_gemma_tune.cli import cli


def run_cli(args: list[str], env: dict | None = None, input: str | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, input=input, catch_exceptions=False)


def snapshot(root: Path, quick: bool = False) -> dict[str, str]:
    """Every file under root with its content hash, to prove nothing was written or changed.

    quick: (size, mtime, inode) instead of the hash, for large trees (any write or atomic
    replace changes one of them).
    """
    root = Path(root)

    def key(p: Path) -> str:
        if quick:
            st = p.stat()
            return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        return hashlib.sha256(p.read_bytes()).hexdigest()

    return {
        str(p.relative_to(root)): key(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(root)) + "/": "dir" for p in root.rglob("*") if p.is_dir()}


def assert_one_line_error(result, *needles: str, code: int | None = None) -> str:
    """Non-zero exit, exactly one line on stderr starting with 'Error:', no traceback."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
