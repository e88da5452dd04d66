"""The BLAS MLX computes with on a Linux CPU, and using OpenBLAS whenever it is installed.

MLX's CPU build (`mlx[cpu]`) bundles a reference BLAS that is ~30x slower than Debian's OpenBLAS
for float32 matrix products (FINDINGS.md: 2.5 against 86 GFLOP/s; a 4-step run took 274.5 s
instead of 21.6 s). The library can only be swapped when the process starts (LD_PRELOAD), so the
CLI restarts itself once with OpenBLAS preloaded when it is installed and not loaded yet
(MLX_GEMMA_TUNE_OPENBLAS=0 turns this off), and otherwise says in one line how to get it.
Nothing happens on macOS, where MLX uses the Metal GPU and Accelerate.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

INSTALL_HINT = "sudo apt install libopenblas0-pthread"
_MARK = "MLX_GEMMA_TUNE_REEXEC"  # set in the restarted process, so that it never restarts twice


def openblas_library() -> Path | None:
    """Debian's OpenBLAS for this machine's architecture, if installed (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    arch = "aarch64" if platform.machine() in ("aarch64", "arm64") else "x86_64"
    lib = Path(f"/usr/lib/{arch}-linux-gnu/libopenblas.so.0")
    return lib if lib.exists() else None


def openblas_loaded() -> bool:
    """OpenBLAS is mapped into this process (preloaded, or linked)."""
    try:
        return "libopenblas" in Path("/proc/self/maps").read_text(errors="replace")
    except OSError:
        return False


def slow_reference_blas() -> bool:
    """On Linux, MLX will compute with its slow reference BLAS in this process."""
    return sys.platform.startswith("linux") and not openblas_loaded()


def restart_with_openblas(argv: list[str]) -> None:
    """Replace this process by the same command with OpenBLAS preloaded (os.execve; does not
    return) when it is installed, not loaded, allowed, and this is not already the restarted
    process; otherwise return at once."""
    lib = openblas_library()
    if (lib is None or openblas_loaded() or os.environ.get(_MARK) or
            os.environ.get("MLX_GEMMA_TUNE_OPENBLAS", "1") == "0"):
        return
    env = dict(os.environ, **{_MARK: "1"})
    env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(lib)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mlx_gemma_tune", *argv], env)


def slow_note() -> str | None:
    """One line for the user when this process computes with the slow reference BLAS, else None."""
    if not slow_reference_blas():
        return None
    if openblas_library() is not None:  # installed, but switched off or not preloaded
        return ("MLX is using its slow reference BLAS (~30x slower on this CPU): unset MLX_GEMMA_TUNE_OPENBLAS=0, or "
                f"run with LD_PRELOAD={openblas_library()}")
    return f"MLX is using its slow reference BLAS (~30x slower on this CPU): {INSTALL_HINT} makes it fast"
