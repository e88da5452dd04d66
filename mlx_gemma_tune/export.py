"""Back to Hugging Face: a transformers checkpoint of a run merged in full precision (merge.py merges).

The way back is declarative: per original model_type, a table of key prefixes maps MLX
names to Hugging Face names (one function each way, tested as a round trip), MoE experts
are fused back into transformers' 3-D parameters, and everything mlx-lm dropped (vision
and audio towers, ...) is restored from the source checkpoint, byte for byte.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlx_gemma_tune import families, fsio, hf_checkpoint
from mlx_gemma_tune.errors import Progress, UserError
from mlx_gemma_tune.merge import load_merged

# (MLX prefix, Hugging Face prefix) per original model_type; unlisted names are identical.
KEY_PREFIXES: dict[str, list[tuple[str, str]]] = {
    "gemma3_text": [],
    "gemma4_text": [],
    "gemma3n": [],
    "gemma3n_text": [("model.language_model.", "model.")],
    "gemma4": [("language_model.model.", "model.language_model.")],
}
MOE_MLX = (".switch_glu.gate_proj.weight", ".switch_glu.up_proj.weight", ".switch_glu.down_proj.weight")
# Files of a source checkpoint that an export does not copy (weights are rewritten; no code).
NOT_COPIED = ("config.json", "model.safetensors.index.json", "provenance.json")
NOT_COPIED_SUFFIXES = (".safetensors", ".py", ".bin", ".pt", ".pth", ".gguf", ".pkl", ".ckpt", ".msgpack", ".h5")


def hf_prefixes(model_type: str) -> list[tuple[str, str]]:
    """(MLX key prefix, Hugging Face key prefix) pairs of a model type; UserError for a type without an
    export mapping."""
    if model_type not in KEY_PREFIXES:
        raise UserError(f"export to Hugging Face is not supported for model_type '{model_type}'",
                        hint="supported: " + ", ".join(KEY_PREFIXES))
    return KEY_PREFIXES[model_type]


def to_hf_key(model_type: str, key: str) -> str:
    for mlx, hf in hf_prefixes(model_type):
        if key.startswith(mlx):
            return hf + key[len(mlx):]
    return key


def to_mlx_key(model_type: str, key: str) -> str:
    for mlx, hf in hf_prefixes(model_type):
        if key.startswith(hf) and not key.startswith(mlx):
            return mlx + key[len(hf):]
    return key


def to_hf_tensors(model_type: str, weights: dict) -> dict:
    """MLX text-model tensors -> Hugging Face names, MoE experts fused back to 3-D parameters."""
    import mlx.core as mx

    out = {}
    for key, value in weights.items():
        if key.endswith((MOE_MLX[1], MOE_MLX[2])):
            continue
        if key.endswith(MOE_MLX[0]):  # gate (E, I, H) + up (E, I, H) -> gate_up_proj (E, 2I, H), gate first
            base = key[: -len(MOE_MLX[0])]
            out[to_hf_key(model_type, base + ".gate_up_proj")] = mx.concatenate(
                [value, weights[base + MOE_MLX[1]]], axis=1)
            out[to_hf_key(model_type, base + ".down_proj")] = weights[base + MOE_MLX[2]]
            continue
        out[to_hf_key(model_type, key)] = value
    return out


def to_mlx_tensors(model_type: str, weights: dict) -> dict:
    """The inverse of to_hf_tensors (for the text model; what mlx-lm's sanitize does for these keys)."""
    import mlx.core as mx

    out = {}
    for key, value in weights.items():
        if key.endswith(".experts.gate_up_proj"):
            base = to_mlx_key(model_type, key[: -len(".gate_up_proj")])
            gate, up = mx.split(value, 2, axis=1)
            out[base + MOE_MLX[0]], out[base + MOE_MLX[1]] = gate, up
        elif key.endswith(".experts.down_proj"):
            out[to_mlx_key(model_type, key[: -len(".down_proj")]) + MOE_MLX[2]] = value
        else:
            out[to_mlx_key(model_type, key)] = value
    return out


# ---- loading a run or a fused model, merged ------------------------------------------------


# ---- Hugging Face checkpoint ----------------------------------------------------------------


@dataclass
class ExportResult:
    output: str
    format: str
    source: str
    tensors: int = 0
    restored: dict = field(default_factory=dict)  # component -> tensors copied from the source
    dtype: str | None = None
    verified_max_diff: float | None = None  # --verify: max |logit difference|, transformers vs MLX
    verify_threshold: float | None = None  # --verify: the largest difference float32 rounding explains
    verify_passed: bool | None = None
    verify_tokens: int | None = None
    verify_base_max_diff: float | None = None  # --verify: the same check on the source checkpoint (no adapter)
    size_bytes: int = 0
    seconds: float = 0.0
    verify_perplexity: dict | None = None  # gguf --verify: {"mlx": .., "f16": .., OUTTYPE: ..} (llama.cpp's but mlx)
    verify_top1: dict | None = None  # gguf --verify: fraction of positions with the same greedy next token
    verify_text: str | None = None  # gguf --verify: what the calibration text was
    reference_size_bytes: int | None = None  # gguf --verify: size of the f16 file, for the ratio
    tensor_types: dict | None = None  # gguf: {GGML type: tensors}, what llama.cpp's quantizer chose
    base_gguf: str | None = None  # gguf-lora --ollama: the base model's GGUF the Modelfile names

    def to_dict(self) -> dict:
        return asdict(self)


def export_hf(run_or_fused: str, out: str, *, dtype: str | None = None, base: str | None = None,
              verify: bool = False, force: bool = False, max_shard_gb: int = 5,
              progress: Progress | None = None) -> ExportResult:
    """A checkpoint transformers loads as the original class, with the towers and config restored."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import make_shards

    started = time.monotonic()
    say = progress or (lambda _m: None)
    out_p = Path(out).expanduser()
    fsio.check_output_dir(out_p, force=force, inputs=(Path(run_or_fused),))
    merged = load_merged(run_or_fused, base, progress)
    source_config = hf_checkpoint.read_config(merged.source)
    hf_prefixes(merged.model_type)
    target = dtype or _config_dtype(source_config) or "float32"
    say("Mapping weights to Hugging Face names")
    ours = to_hf_tensors(merged.model_type, dict(tree_flatten(merged.model.parameters())))
    source_keys: dict[str, Path] = {}
    for f in hf_checkpoint.weight_files(merged.source):
        for name in hf_checkpoint.inspect_weights(f, hash_it=False).tensors:
            source_keys[name] = f
    extra = sorted(set(ours) - set(source_keys))
    if extra:  # a mapping bug, never silently written
        raise UserError(f"internal: {len(extra)} exported tensors have no counterpart in the source checkpoint "
                        f"(e.g. {extra[0]}); please report this")
    restored: dict[str, int] = {}
    weights = {k: v.astype(getattr(mx, target)) for k, v in ours.items()}
    by_file: dict[Path, list[str]] = {}
    for name, f in source_keys.items():
        if name not in weights:
            by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        loaded = mx.load(str(f))
        for name in names:
            v = loaded[name]
            weights[name] = v.astype(getattr(mx, target)) if mx.issubdtype(v.dtype, mx.floating) else v
            comp = families.tower_component(name) or name.split(".")[-2]
            restored[comp] = restored.get(comp, 0) + 1
    if merged.adapter is not None:  # an image run's adapter on the vision projector: merged here
        from mlx_gemma_tune import multimodal

        delta = multimodal.projector_delta(merged.adapter)
        if delta is not None:
            w = weights[multimodal.PROJECTOR_HF]
            weights[multimodal.PROJECTOR_HF] = (w.astype(mx.float32) + delta).astype(w.dtype)
    say("Writing the Hugging Face checkpoint")
    with fsio.staged_dir(out_p) as tmp:
        shards = make_shards(dict(sorted(weights.items())), max_shard_gb)
        index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            mx.save_safetensors(str(tmp / name), shard, metadata={"format": "pt"})
            index["weight_map"].update({k: name for k in shard})
        fsio.atomic_write_json(tmp / "model.safetensors.index.json", index)
        config = {k: v for k, v in source_config.items() if k not in ("quantization", "quantization_config")}
        _set_dtype(config, target)
        fsio.atomic_write_json(tmp / "config.json", config)
        for f in sorted(merged.source.iterdir()):
            if f.is_file() and f.name not in NOT_COPIED and not f.name.endswith(NOT_COPIED_SUFFIXES):
                shutil.copyfile(f, tmp / f.name)
    result = ExportResult(str(out_p), "hf", str(merged.source), len(weights), restored, target,
                          size_bytes=fsio.dir_size(out_p))
    if verify:
        say("Verifying with transformers")
        check = verify_hf(out_p, merged.model, target)
        result.verified_max_diff, result.verify_threshold = check.max_diff, check.threshold
        result.verify_passed, result.verify_tokens = check.passed, check.tokens
        say("Verifying the base model the same way, for scale")
        from mlx_gemma_tune import models

        base_model, _ = models.load_model(merged.source)
        result.verify_base_max_diff = verify_hf(merged.source, base_model,
                                                _config_dtype(source_config) or "float32").max_diff
    result.seconds = round(time.monotonic() - started, 2)
    return result


def _config_dtype(config: dict) -> str | None:
    for cfg in (config, families.text_config(config)):
        for key in ("dtype", "torch_dtype"):
            if cfg.get(key) in ("float32", "bfloat16", "float16"):
                return cfg[key]
    return None


def _set_dtype(config: dict, dtype: str) -> None:
    for cfg in [config] + [v for v in config.values() if isinstance(v, dict)]:
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = dtype
    config.setdefault("dtype", dtype)


# Natural text, so the check runs through ordinary tokens (not ids that land on special tokens).
VERIFY_TEXT = ("The quick brown fox jumps over the lazy dog. A fine-tuned model should compute exactly what "
               "its weights say, in every framework that loads it.")
VERIFY_ULPS = 2**10  # the tolerance, in float32 units in the last place of the largest logit


@dataclass
class Verification:
    """transformers on an export against the MLX model it came from, both computing in float32 on
    weights rounded to the export's dtype, so that only a wrong export (names, layout, config, a
    missing tensor) can move the logits beyond float32 rounding."""
    max_diff: float  # max |logit difference| over every position
    threshold: float  # VERIFY_ULPS float32 ulps of the largest |logit|: accumulation over tens of
    # layers and thousand-term dot products stays far below (Gemma 3 270M: 8e-5 of 3.6e-3)
    logit_scale: float  # max |logit| of transformers' output
    tokens: int

    @property
    def passed(self) -> bool:
        return self.max_diff <= self.threshold


def hf_class_for(config: dict):
    """The transformers class to load an export with (Gemma 3n: the text model; its vision tower needs timm)."""
    import transformers

    arch = (config.get("architectures") or ["AutoModelForCausalLM"])[0]
    if arch == "Gemma3nForConditionalGeneration":
        arch = "Gemma3nForCausalLM"
    return getattr(transformers, arch, transformers.AutoModelForCausalLM)


def verify_hf(path: Path, mlx_model, dtype: str = "float32", text: str = VERIFY_TEXT) -> Verification:
    """Logits of transformers on the export at `path` against the MLX model, at every position of
    `text` (tokenized by the export's tokenizer, <bos> first). The MLX model's weights are rounded
    to the export's `dtype` and both sides compute in float32 (the MLX model is changed in place).
    Raises UserError when torch is missing or transformers finds weights missing."""
    try:
        import torch
    except ImportError:
        raise UserError("--verify needs torch and transformers", hint="pip install torch") from None
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    config = json.loads((Path(path) / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokens = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    tokens = [tokenizer.bos_token_id, *tokens] if tokenizer.bos_token_id is not None else tokens
    mlx_model.update(tree_unflatten([(k, v.astype(getattr(mx, dtype)).astype(mx.float32))
                                     for k, v in tree_flatten(mlx_model.parameters())
                                     if mx.issubdtype(v.dtype, mx.floating)]))
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        hf, info = hf_class_for(config).from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    if info.get("missing_keys"):
        raise UserError(f"transformers found {len(info['missing_keys'])} weights missing from the export "
                        f"(e.g. {min(info['missing_keys'])}); please report this", where=str(path))
    hf.eval()
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].float().numpy()
    got = np.array(mlx_model(mx.array([tokens]))[0].astype(mx.float32))
    scale = float(np.abs(ref).max())
    return Verification(float(np.abs(ref - got).max()), VERIFY_ULPS * float(np.finfo(np.float32).eps) * max(scale, 1.0),
                        scale, len(tokens))
