"""Writes that never leave a half-written file or destroy existing output.

A file is written to a temporary name in the same directory, fsynced, then renamed
over its target (and the directory fsynced). A whole output directory is built under a
hidden temporary name beside it, fsynced, and only renamed into place when complete.
A process killed midway leaves at most hidden leftovers (`is_leftover`), which
`remove_leftovers` clears; a full disk becomes one OutputError naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlx_gemma_tune.errors import OutputError

TEMP_MARKERS = (".partial-", ".old-", ".tmp")  # in the hidden names of our unfinished writes


def is_leftover(path: Path) -> bool:
    """A hidden temporary file or directory of ours, left behind by a killed process."""
    name = Path(path).name
    return name.startswith(".") and any(m in name for m in TEMP_MARKERS)


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries (renames), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's file mode creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path: Path, directory: bool = False) -> None:
    """Give `path` the mode a plain open() / mkdir() would: 0o666 / 0o777 less the umask.

    tempfile.mkstemp / mkdtemp create 0o600 / 0o700 whatever the umask, and a rename keeps the
    mode: without this, outputs staged under a temporary name would be unreadable by other
    accounts (an ollama service user, a container with another uid)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def temp_path(folder: Path, suffix: str) -> Path:
    """A new empty hidden file in `folder` (for an intermediate the caller deletes), never an existing one."""
    fd, tmp = tempfile.mkstemp(prefix=".mlx-gemma-tune.", suffix=suffix, dir=folder)
    os.close(fd)
    return Path(tmp)


def atomic_save_safetensors(path: Path, arrays: dict, metadata: dict | None = None) -> None:
    """mx.save_safetensors(arrays) to `path`, atomically (atomic_write_with)."""
    import mlx.core as mx

    def write(tmp: Path) -> None:
        target = tmp.with_name(tmp.name + ".safetensors")  # mx.save_safetensors appends it otherwise
        mx.save_safetensors(str(target), arrays, metadata=metadata or {})
        target.replace(tmp)

    atomic_write_with(path, write)


def atomic_write_with(path: Path, write) -> None:
    """write(temp_path) creates the file's content; it then replaces `path` whole, durably. A new
    file gets the mode a plain open() would give it under the user's umask; a file it replaces
    keeps its own (a transcript the user made private stays private)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        try:
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        except FileNotFoundError:
            plain_mode(Path(tmp))
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if _is_disk_full(exc):
            raise _disk_full(path) from exc
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


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
    is complete. `out` and everything in it get the modes plain mkdir() / open() would
    give under the user's umask (files written there through tempfile included).
    """
    out = Path(out).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        plain_mode(tmp, directory=True)
        for f in tmp.rglob("*"):
            if not f.is_symlink():
                plain_mode(f, directory=f.is_dir())
        for f in tmp.rglob("*"):  # every byte on disk before the directory takes its name
            fsync_path(f)
        fsync_path(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_path(out.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(exc):
            raise _disk_full(out) from exc
        raise


def remove_dir(path: Path) -> None:
    """Delete a directory so that a kill midway leaves a hidden leftover, never a half-deleted `path`."""
    path = Path(path)
    doomed = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, doomed / "x")
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(root: Path) -> list[Path]:
    """Delete the hidden temporary files and directories that killed writes left under root."""
    found = [p for p in Path(root).rglob(".*") if is_leftover(p) and not any(is_leftover(a) for a in p.parents)]
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return found


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, or MLX's own failed write ("[write] Unable to write N bytes to file.")."""
    import errno

    if isinstance(exc, OutputError):
        return False  # already explained
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("no space left" in text or "unable to write" in text)


def _free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(Path(path).parent).free / 2**20:,.0f} MiB free"
    except OSError:
        return "free space unknown"


def _disk_full(path: Path) -> OutputError:
    return OutputError(f"could not be written: no space left on the disk ({_free(path)}); nothing was replaced",
                       where=str(path), hint="free some space and run the command again")


def disk_full(exc: BaseException, default_path: Path) -> tuple[str, str] | None:
    """(where, "no space left on the disk (N MiB free)") when exc is a full disk, else None."""
    if isinstance(exc, OutputError) and "no space left" in exc.message:
        return exc.where or str(default_path), f"no space left on the disk ({_free(Path(exc.where or default_path))})"
    if _is_disk_full(exc):
        return str(default_path), f"no space left on the disk ({_free(default_path)})"
    return None


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
