"""Test configuration: fast, private, offline MLX; tiny Gemma fixtures built once and cached.

The environment is set here, before anything imports mlx, so the product's own
defaults stay untouched:
  - MLX_DISABLE_COMPILE=1: mx.compile would otherwise build C++ kernels for 30-65 s
    per architecture on a cold cache (same numbers either way).
  - a private TMPDIR, so MLX's kernel cache and our temp files never mix with the user's.
  - HF_HUB_OFFLINE=1 and an empty HF_HOME: no test can reach the network or a real cache.
"""

from __future__ import annotations

import contextlib
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

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from fixtures import gemma_fixtures


@pytest.fixture(scope="session", autouse=True)
def _model_cache(request, worker_id):  # worker_id: pytest-xdist's fixture, "master" without -n
    """Converted bases and the demo model go to a cache kept between test runs, never the user's.

    Under pytest-xdist each worker has its own converted-model cache (two processes converting
    the same base into one cache would race on the directory's rename); the demo model (~2.3 GB,
    used by one test) is shared through a link, so it is built once whichever worker runs it.
    """
    shared = Path(request.config.cache.mkdir("mlx-gemma-tune-cache"))
    if worker_id == "master":
        os.environ["MLX_GEMMA_TUNE_CACHE"] = str(shared)
        return
    mine = shared / "workers" / worker_id
    mine.mkdir(parents=True, exist_ok=True)
    (shared / "demo").mkdir(exist_ok=True)
    if not (mine / "demo").is_symlink():
        (mine / "demo").symlink_to(shared / "demo", target_is_directory=True)
    os.environ["MLX_GEMMA_TUNE_CACHE"] = str(mine)


@contextlib.contextmanager
def _exclusive(lock: Path):
    """Hold an exclusive lock on `lock` (created if missing): one xdist worker builds, the others wait."""
    import fcntl

    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    with _exclusive(cache.parent / "gemma-fixtures.lock"):
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
    from mlx_gemma_tune import prepare, trainer

    runs = {}

    def get(family):
        if family not in runs:
            root = tmp_path_factory.mktemp(f"run-{family}")
            data = root / "paris.jsonl"
            data.write_text("".join(json.dumps({"prompt": p, "completion": ANSWER}) + "\n" for p in PROMPTS))
            sets = ("train.lr=3e-3", "lora.rank=8", "lora.dropout=0.0", "train.iters=60", "train.batch_size=4",
                    "data.valid_fraction=0", "train.warmup_ratio=0.05", "train.schedule=constant")
            trainer.run(prepare.prepare_run(model=str(hf_model(family)), data=str(data), out=str(root / "run"),
                                            sets=sets))
            runs[family] = root / "run"
        return runs[family]

    return get


# The longest test files, longest first (`--durations` on a 2-core machine), so that with two
# workers none of them is left to run alone at the end. pytest-xdist's loadfile scheduler gives each
# worker its first two files at once: the real-model quickstart (~3-4 min, longer than the rest of
# its worker's share) is paired with a file of a few seconds (test_docs.py), so that no long file
# waits behind it.
LONGEST_FIRST = ("test_quickstart.py", "test_packing.py", "test_demo_recipe.py", "test_docs.py", "test_distributed.py",
                 "test_crash_safety.py", "test_offline.py", "test_eval_tasks.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept
