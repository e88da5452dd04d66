"""Reading a Hugging Face checkpoint safely: where it is, its config, its weight files.

Everything here checks before anything is loaded, so a bad directory gives one clear
line instead of a deep traceback from mlx or transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from mlx_gemma_tune.errors import InputError, OfflineError

# A hub id looks like "owner/name" (one slash, no leading "." or "/").
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
# What a conversion needs from the hub: weights, configs, tokenizer. No code files.
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


@dataclass
class Source:
    """A local checkpoint directory and where it came from."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        if self.repo_id:
            return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id
        return str(self.path)


@dataclass
class WeightFile:
    name: str
    size: int
    sha256: str
    tensors: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # name -> (dtype, shape)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(src: str, revision: str | None = None) -> Source:
    """A local directory as is, or a hub repo id fetched (or found in the cache)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError("is a file, not a model directory", where=src,
                             hint="pass the directory that holds config.json")
        return Source(path.resolve())
    if not _REPO_ID.match(src):
        raise InputError("no such directory", where=src,
                         hint="pass a local Hugging Face model directory or a hub id like google/gemma-3n-E2B-it")
    return _from_hub(src, revision)


def _from_hub(repo_id: str, revision: str | None) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                  local_files_only=offline())
    except GatedRepoError:
        raise OfflineError(f"'{repo_id}' is gated on the Hugging Face Hub",
                           hint="accept its licence on huggingface.co and run `hf auth login`") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise InputError(f"'{repo_id}' is neither a local directory nor a model on the Hugging Face Hub",
                         hint="check the spelling, or log in if the repository is private") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline() else "the Hugging Face Hub cannot be reached"
        raise OfflineError(f"'{repo_id}' is not in the local Hugging Face cache and {why}",
                           hint="download it once while online, or pass a local directory") from None
    except (HfHubHTTPError, OSError) as exc:
        raise OfflineError(f"could not download '{repo_id}': {exc}") from None
    path = Path(local)
    # A snapshot directory is named after the commit it holds.
    return Source(path, repo_id=repo_id, revision=path.name)


def read_config(model_dir: Path) -> dict:
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise InputError("has no config.json", where=str(model_dir),
                         hint="pass a Hugging Face model directory (config.json + *.safetensors)")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"is not valid JSON (line {exc.lineno}: {exc.msg})", where=str(cfg)) from None
    except UnicodeDecodeError:
        raise InputError("is not UTF-8 text", where=str(cfg)) from None
    if not isinstance(config, dict):
        raise InputError("must hold a JSON object", where=str(cfg))
    return config


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked against its index if it has one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise InputError("is not a valid safetensors index (no weight_map)", where=str(index)) from None
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise InputError(f"names weight files that are missing: {', '.join(missing)}", where=str(index),
                             hint="the download is incomplete; fetch the checkpoint again")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        others = sorted(p.name for p in model_dir.glob("*.safetensors"))
        pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled and not others:
            raise InputError(f"holds {', '.join(pickled)}, a pickled PyTorch checkpoint, and no safetensors",
                             where=str(model_dir), hint="only safetensors are loaded (unpickling can run code); "
                             "use the model's safetensors release")
        hint = f"found {', '.join(others)} but weights must be named model*.safetensors" if others else \
            "only safetensors checkpoints are supported"
        raise InputError("has no model*.safetensors weight files", where=str(model_dir), hint=hint)
    return files


def check_float_weights(files: list[WeightFile], model_dir: Path) -> None:
    """Refuse a Hugging Face checkpoint whose weight tensors are not floating point (e.g. int8 exports)."""
    for f in files:
        for name, (dtype, _shape) in f.tensors.items():
            if name.endswith("weight") and dtype not in FLOAT_DTYPES:
                raise InputError(f"tensor '{name}' is {dtype}, not a float type", where=str(model_dir / f.name),
                                 hint="convert from the original float checkpoint (F32, F16 or BF16)")


def load_safetensors(path: Path) -> dict:
    """mx.load of a safetensors file whose header was checked first (a broken file is named, not a crash)."""
    import mlx.core as mx

    inspect_weights(Path(path), hash_it=False)
    return mx.load(str(path))


def inspect_weights(path: Path, hash_it: bool = True) -> WeightFile:
    """Parse a safetensors header and check the file holds every byte it promises."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InputError("is empty or truncated (no safetensors header)", where=str(path),
                             hint="re-download or re-create it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise InputError("is truncated or not a safetensors file (header runs past the end)",
                             where=str(path), hint="re-download or re-create it")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError("is corrupt (unreadable safetensors header)", where=str(path),
                             hint="re-download or re-create it") from None
    tensors: dict[str, tuple[str, list[int]]] = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
            count = 1
            for d in shape:
                count *= d
            ok = stop - begin == count * _DTYPE_BYTES.get(dtype, 0) or dtype not in _DTYPE_BYTES
        except (KeyError, TypeError, ValueError):
            raise InputError(f"is corrupt (bad header entry for '{name}')", where=str(path)) from None
        if not ok:
            raise InputError(f"is corrupt (tensor '{name}' has the wrong byte size)", where=str(path))

        tensors[name] = (dtype, list(shape))
        end = max(end, stop)
    if 8 + n + end > size:
        raise InputError(f"is truncated: {size:,} bytes on disk, {8 + n + end:,} expected", where=str(path),
                         hint="re-download or re-create it")
    return WeightFile(path.name, size, _sha256(path) if hash_it else "", tensors)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def combined_hash(files: list[WeightFile]) -> str:
    """One digest for a set of weight files: sha256 over 'name digest' lines."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        h.update(f"{f.name} {f.sha256}\n".encode())
    return h.hexdigest()


def has_tokenizer(model_dir: Path) -> bool:
    return (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer.model").is_file()


def source_of(model_dir: Path, base_override: str | None = None) -> Path:
    """The original Hugging Face checkpoint behind an MLX model directory: `base_override` when given,
    else the source recorded in its provenance.json at convert time, else the directory itself (a
    Hugging Face directory used directly as a base). Raises InputError when the one it names is gone."""
    if base_override:
        p = Path(base_override).expanduser()
        if not (p / "config.json").is_file():
            raise InputError("is not a Hugging Face model directory (no config.json)", where=str(p))
        return p
    prov = model_dir / "provenance.json"
    if prov.is_file():
        recorded = Path(json.loads(prov.read_text())["source"]["path"])
        if not (recorded / "config.json").is_file():
            raise InputError(f"the source checkpoint recorded at convert time is missing: {recorded}",
                             where=str(prov), hint="if it moved, pass its new location with --base PATH")
        return recorded
    return model_dir  # a Hugging Face directory used directly as the base
