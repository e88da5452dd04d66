"""Test configuration: fast, private, offline MLX; tiny Gemma fixtures built once and cached.

The environment is set here, before anything imports mlx, so the product's own
defaults stay untouched:
  - MLX_DISABLE_COMPILE=1: mx.compile would otherwise build C++ kernels for 30-65 s
    per architecture on a cold cache (same numbers either way).
  - a private TMPDIR, so MLX's kernel cache and our temp files never mix with the user's.
  - HF_HUB_OFFLINE=1 and an empty HF_HOME: no test can reach the network or a real cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

_PRIVATE_TMP = tempfile.mkdtemp(prefix="mgt-tests-")
os.environ["TMPDIR"] = _PRIVATE_TMP
tempfile.tempdir = None  # forget the cached default so the line above takes effect
os.environ["MLX_DISABLE_COMPILE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_PRIVATE_TMP, "hf-home")
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from fixtures import gemma_fixtures  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _model_cache(request):
    """Converted bases and the demo model go to a cache kept between test runs, never the user's."""
    os.environ["MLX_GEMMA_TUNE_CACHE"] = str(request.config.cache.mkdir("mlx-gemma-tune-cache"))


def _fixture_key() -> str:
    """Rebuild the cached fixtures whenever their builder or the libraries change."""
    from importlib.metadata import version

    h = hashlib.sha256()
    for p in sorted((TESTS / "fixtures").glob("*.py")):
        h.update(p.read_bytes())
    for pkg in ("transformers", "torch", "tokenizers"):
        h.update(version(pkg).encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def fixtures_root(request) -> Path:
    """Directory holding one Hugging Face-layout checkpoint per family (built once, cached)."""
    cache = Path(request.config.cache.mkdir("gemma-fixtures"))
    root = cache / _fixture_key()
    if not (root / ".complete").exists():
        for stale in cache.iterdir():
            shutil.rmtree(stale, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix="building-", dir=cache))
        gemma_fixtures.build_all(partial)
        (partial / ".complete").write_text("ok\n")
        os.replace(partial, root)
    return root


@pytest.fixture(scope="session")
def hf_model(fixtures_root):
    """hf_model(family) -> path of that family's Hugging Face checkpoint (read-only: copy to modify)."""

    def get(family: str) -> Path:
        path = fixtures_root / family
        assert path.is_dir(), f"no fixture for {family}"
        return path

    return get


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_PRIVATE_TMP, ignore_errors=True)


PROMPTS = ["Capital of France?", "Two plus two?", "Colour of the sky?", "Opposite of hot?", "First letter?",
           "Largest ocean?", "Frozen water?", "Baby cat?"]
ANSWER = "Paris."


@pytest.fixture(scope="session")
def trained_run(hf_model, tmp_path_factory):
    """trained_run(family) -> a run directory whose adapter answers 'Paris.' to everything."""
    from mlx_gemma_tune import session, trainer

    runs = {}

    def get(family):
        if family not in runs:
            root = tmp_path_factory.mktemp(f"run-{family}")
            data = root / "paris.jsonl"
            data.write_text("".join(json.dumps({"prompt": p, "completion": ANSWER}) + "\n" for p in PROMPTS))
            sets = ("train.lr=3e-3", "lora.rank=8", "lora.dropout=0.0", "train.iters=60", "train.batch_size=4",
                    "data.valid_fraction=0", "train.warmup_ratio=0.05", "train.schedule=constant")
            trainer.run(session.prepare_run(model=str(hf_model(family)), data=str(data), out=str(root / "run"),
                                            sets=sets))
            runs[family] = root / "run"
        return runs[family]

    return get
