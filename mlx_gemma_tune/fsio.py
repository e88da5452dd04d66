"""Writes that never leave a half-written file or destroy existing output.

A file is written to a temporary name in the same directory, fsynced, then renamed
over its target. A whole output directory is built under a hidden temporary name
beside it and only renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mlx_gemma_tune.errors import OutputError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_output_dir(out: Path, *, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output directory we must not write, before any work is done."""
    out = Path(out).expanduser().absolute()
    for src in inputs:
        src = Path(src).resolve()
        resolved = out.resolve()
        if resolved == src or src in resolved.parents:
            raise OutputError("is inside the input directory", where=str(out),
                              hint="choose an output directory outside the input")
        if resolved in src.parents:
            raise OutputError("contains the input directory", where=str(out),
                              hint="choose an output directory that does not hold the input")
    if out.exists():
        if not out.is_dir():
            raise OutputError("exists and is a file", where=str(out), hint="choose another path")
        if not force and any(out.iterdir()):
            raise OutputError("already exists", where=str(out), hint="pass --force to replace it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot be created: {parent} is a file", where=str(out), hint="choose another path")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot be created: {parent} is not writable", where=str(out))


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `out` when the block succeeds.

    On any failure the temporary directory is removed and `out` is untouched. An
    existing `out` (the caller checked --force) is replaced only after the new one
    is complete.
    """
    out = Path(out).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
