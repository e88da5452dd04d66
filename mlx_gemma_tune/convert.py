"""Hugging Face Gemma checkpoint -> MLX model directory (optionally quantized for QLoRA).

The text model is built and loaded by mlx-lm; this module adds what a Gemma user
needs around it: clear refusals, a staged (atomic) output directory, an honest
account of what was quantized and what was not, and a provenance record so that
export can later restore what mlx-lm drops (vision/audio towers, the original config).
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mlx_gemma_tune import families, fsio, hf_checkpoint
from mlx_gemma_tune.errors import InputError, Progress, UserError
from mlx_gemma_tune.version import VERSION

PROVENANCE_FILE = "provenance.json"
DTYPES = ("bfloat16", "float16", "float32")
QUANT_BITS = (4, 8)
ROUTER_BITS = 8



@dataclass
class ConvertResult:
    family: str
    variant: str
    model_type: str
    source: str
    output: str
    dtype: str
    parameters: int
    quantization: dict | None  # {"bits", "group_size", "mode"} or None
    quantized_layers: int = 0
    kept_at_higher_precision: list[dict] = field(default_factory=list)  # {"path", "bits", "reason"}
    unquantized: list[dict] = field(default_factory=list)  # {"path", "reason"}
    dropped: list[dict] = field(default_factory=list)  # {"component", "tensors", "parameters"}
    size_bytes: int = 0
    seconds: float = 0.0
    multimodal: bool = False  # the towers are kept (mlx-vlm)
    # --quantize: what it cost on calibration text: {"text", "tokens", "perplexity_source", "perplexity_quantized",
    # "top1_agreement" (0..1), "worst_layers": [{"path", "bits", "rel_error"}] (relative RMS weight error)}
    quality: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def convert(
    src: str,
    out: str | Path,
    *,
    quantize: int | None = None,
    group_size: int = 64,
    dtype: str | None = None,
    force: bool = False,
    revision: str | None = None,
    progress: Progress | None = None,
    multimodal: bool = False,
    quant_recipe: str | None = None,
    calibration: str | None = None,
) -> ConvertResult:
    """Convert `src` (local directory or hub id) to an MLX model directory at `out`.

    multimodal: keep the vision (and audio) towers, converted by mlx-vlm (Gemma 4), for image
    fine-tuning and `chat --image`; otherwise the text model alone, by mlx-lm. quantize: also
    measures what it costs (ConvertResult.quality) on calibration text (calibration.chunks: the
    built-in sample or the dataset file `calibration`): perplexity before and after, how often the
    greedy next token stays, the layers with the largest relative weight error. quant_recipe: one of
    mlx-lm's mixed-precision recipes (mlx_lm.convert.QUANT_RECIPES, e.g. mixed_4_6: more bits for
    v_proj / down_proj in some layers and for lm_head, as llama.cpp's Q4_K_M)."""
    started = time.monotonic()
    say = progress or (lambda _msg: None)
    if quantize is not None and quantize not in QUANT_BITS:
        raise UserError(f"--quantize must be one of {', '.join(map(str, QUANT_BITS))}, not {quantize}")
    if group_size not in (32, 64, 128):
        raise UserError(f"--group-size must be 32, 64 or 128, not {group_size}")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype}")
    out = Path(out).expanduser().absolute()
    if Path(src).expanduser().exists():  # check the output before any download or load
        fsio.check_output_dir(out, force=force, inputs=(Path(src).expanduser(),))
    else:
        fsio.check_output_dir(out, force=force)

    say("Locating the checkpoint")
    source = hf_checkpoint.resolve(src, revision)
    config = hf_checkpoint.read_config(source.path)
    detected = families.detect(config, where=str(source.path / "config.json"))
    if not hf_checkpoint.has_tokenizer(source.path):
        raise InputError("has no tokenizer (tokenizer.json or tokenizer.model)", where=str(source.path),
                         hint="copy the tokenizer files of the original model next to config.json")
    say("Checking weight files")
    files = [hf_checkpoint.inspect_weights(p) for p in hf_checkpoint.weight_files(source.path)]
    hf_checkpoint.check_float_weights(files, source.path)
    if multimodal:
        return _convert_multimodal(source, files, config, detected, out, dtype or _source_dtype(config), quantize,
                                   started, say)

    say("Loading the text model with mlx-lm")
    model, mlx_config, tokenizer = _load(source.path, detected)
    target_dtype = dtype or _source_dtype(config)
    if target_dtype:
        _cast(model, target_dtype)
    parameters = _count_parameters(model)

    quant_info = quality = None
    quantized, kept_high, left_alone = 0, [], []
    if quantize:
        from mlx_gemma_tune import calibration as calib

        say("Scoring the source model on the calibration text")
        chunks, text = calib.chunks(tokenizer, calibration)
        before = calib.mlx_scores(model, chunks)
        say(f"Quantizing to {quantize}-bit (group size {group_size}{', ' + quant_recipe if quant_recipe else ''})")
        mlx_config, quantized, kept_high, left_alone, errors = _quantize(model, mlx_config, quantize, group_size,
                                                                         quant_recipe)
        quant_info = {"bits": quantize, "group_size": group_size, "mode": "affine"} | (
            {"recipe": quant_recipe} if quant_recipe else {})
        say("Scoring the quantized model")
        after = calib.mlx_scores(model, chunks)
        quality = {"text": text, "tokens": before.tokens, "perplexity_source": before.perplexity,
                   "perplexity_quantized": after.perplexity, "top1_agreement": after.agreement(before),
                   "worst_layers": sorted(errors, key=lambda e: -e["rel_error"])[:5]}

    dropped = _dropped_components(files)
    say("Writing the MLX model")
    with fsio.staged_dir(out) as tmp:
        _save(tmp, model, mlx_config, tokenizer, source.path)
        conversion = {"dtype": target_dtype, "quantization": quant_info, "kept_at_higher_precision": kept_high,
                      "unquantized": left_alone, "dropped": dropped}
        fsio.atomic_write_json(tmp / PROVENANCE_FILE, _provenance(source, files, config, detected, conversion))
    return ConvertResult(
        family=detected.family.display,
        variant=detected.variant,
        model_type=detected.model_type,
        source=source.describe(),
        output=str(out),
        dtype=target_dtype or "as stored",
        parameters=parameters,
        quantization=quant_info,
        quantized_layers=quantized,
        kept_at_higher_precision=kept_high,
        unquantized=left_alone,
        dropped=dropped,
        size_bytes=fsio.dir_size(out),
        seconds=round(time.monotonic() - started, 2),
        quality=quality,
    )


def _provenance(source, files, config: dict, detected, conversion: dict) -> dict:
    return {
        "tool": "mlx-gemma-tune",
        "tool_version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "path": str(source.path),
            "repo_id": source.repo_id,
            "revision": source.revision,
            "weights_sha256": hf_checkpoint.combined_hash(files),
            "files": {f.name: {"size": f.size, "sha256": f.sha256} for f in files},
        },
        "family": detected.family.name,
        "model_type": detected.model_type,
        "variant": detected.variant,
        "original_config": config,
        "conversion": conversion,
        "versions": _versions(),
    }


def _convert_multimodal(source, files, config: dict, detected, out: Path, dtype: str | None, quantize: int | None,
                        started: float, say: Progress) -> ConvertResult:
    """The whole model, towers included, converted by mlx-vlm (never running remote code)."""
    from mlx_vlm import convert as vlm_convert

    from mlx_gemma_tune import multimodal

    multimodal.check_model(config, str(source.path / "config.json"))
    if quantize:
        raise UserError("--quantize with --multimodal is not supported yet", hint="convert in float (--dtype)")
    say("Converting the model and its towers with mlx-vlm")
    with fsio.staged_dir(out) as tmp:
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-vlm prints its progress; ours goes through `say`
            vlm_convert(hf_path=str(source.path), mlx_path=str(tmp), dtype=dtype, trust_remote_code=False)
        (tmp / "README.md").unlink(missing_ok=True)  # mlx-vlm's model card names a hub repo this is not
        conversion = {"dtype": dtype, "quantization": None, "multimodal": True, "converter": "mlx-vlm"}
        fsio.atomic_write_json(tmp / PROVENANCE_FILE, _provenance(source, files, config, detected, conversion))
    parameters = sum(math.prod(shape) for f in hf_checkpoint.weight_files(out)
                     for _, shape in hf_checkpoint.inspect_weights(f, hash_it=False).tensors.values())
    return ConvertResult(family=detected.family.display, variant=detected.variant, model_type=detected.model_type,
                         source=source.describe(), output=str(out), dtype=dtype or "as stored", parameters=parameters,
                         quantization=None, size_bytes=fsio.dir_size(out),
                         seconds=round(time.monotonic() - started, 2), multimodal=True)


def _load(path: Path, detected: families.Detected):
    from mlx_lm.utils import load_tokenizer

    from mlx_gemma_tune.models import load_model

    try:
        model, config = load_model(path, lazy=True)
    except ValueError as exc:
        # mlx-lm reports missing/unexpected parameters as a ValueError listing them all.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"weights do not fit a {detected.family.display} model: {first[:300]}",
                         where=str(path), hint="is the checkpoint complete and unmodified?") from None
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as exc:  # noqa: BLE001 (transformers raises many kinds for a broken tokenizer)
        raise InputError(f"tokenizer cannot be loaded: {str(exc).splitlines()[0][:200]}", where=str(path)) from None
    return model, config, tokenizer


def _source_dtype(config: dict) -> str | None:
    for cfg in (config, families.text_config(config)):
        for key in ("torch_dtype", "dtype"):
            if cfg.get(key) in DTYPES:
                return cfg[key]
    return None


def _cast(model, dtype: str) -> None:
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    target = getattr(mx, dtype)
    keep = getattr(model, "cast_predicate", lambda _k: True)

    def cast(k, v):
        return v.astype(target) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v

    model.update(tree_map_with_path(cast, model.parameters()))


def _count_parameters(model) -> int:
    from mlx_lm.utils import get_total_parameters

    return int(get_total_parameters(model))


def _quantize(model, config: dict, bits: int, group_size: int, recipe: str | None = None):
    """Quantize through mlx-lm, recording every decision for the summary and each layer's relative RMS
    weight error ||W - dequantize(quantize(W))|| / ||W||, measured as the layer is quantized."""
    import mlx.core as mx
    from mlx_lm.utils import quantize_model

    model_policy = getattr(model, "quant_predicate", None)
    mixed = None
    if recipe:
        from mlx_lm.convert import QUANT_RECIPES, mixed_quant_predicate_builder

        if recipe not in QUANT_RECIPES:
            raise UserError(f"--quant-recipe must be one of {', '.join(QUANT_RECIPES)}, not {recipe}")
        mixed = mixed_quant_predicate_builder(recipe, model, group_size)
    errors: list[dict] = []
    left_alone: list[dict] = []
    kept_high: list[dict] = []
    for path, module in model.named_modules():
        if hasattr(module, "to_quantized") and hasattr(module, "weight"):
            in_dim = module.weight.shape[-1]
            if in_dim % group_size:
                left_alone.append({"path": path, "reason": f"input dim {in_dim} not divisible by group size {group_size}"})

    def policy(path, module):
        decision = model_policy(path, module) if model_policy else True
        if decision is not False and mixed is not None:  # the recipe's bits, never below the model's own choice
            chosen = mixed(path, module)
            own = decision.get("bits", bits) if isinstance(decision, dict) else 0  # e.g. a router's 8 bits
            decision = chosen | {"bits": max(chosen["bits"], own)}
            if chosen["bits"] != bits and own <= chosen["bits"]:
                kept_high.append({"path": path, "bits": chosen["bits"], "reason": f"{recipe} recipe"})
                return _measured(path, module, decision)
        if isinstance(decision, dict):
            high = decision.get("bits", bits)
            decision = {"group_size": decision.get("group_size", group_size), "bits": max(high, bits)}
            if decision["bits"] != bits or path.endswith("router.proj"):
                kept_high.append({"path": path, "bits": decision["bits"], "reason": "MoE router (routing is precision-sensitive)"
                                  if path.endswith("router.proj") else "model policy"})
        elif not decision:
            left_alone.append({"path": path, "reason": "kept in full precision by the model's policy"})
        return _measured(path, module, decision)

    def _measured(path, module, decision):
        if decision is not False and hasattr(module, "weight") and module.weight.shape[-1] % group_size == 0:
            b = decision.get("bits", bits) if isinstance(decision, dict) else bits
            g = decision.get("group_size", group_size) if isinstance(decision, dict) else group_size
            w = module.weight.astype(mx.float32)
            back = mx.dequantize(*mx.quantize(w, g, b), group_size=g, bits=b)
            err = mx.sqrt(mx.sum(mx.square(w - back)) / mx.maximum(mx.sum(mx.square(w)), 1e-30))
            errors.append({"path": path, "bits": b, "rel_error": float(err)})
        return decision

    with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints a bits-per-weight line
        model, config = quantize_model(model, config, group_size, bits, quant_predicate=policy)
    quantized = sum(1 for _, m in model.named_modules() if hasattr(m, "bits") and hasattr(m, "scales"))
    return config, quantized, kept_high, left_alone, errors


def _dropped_components(files: list[hf_checkpoint.WeightFile]) -> list[dict]:
    tally: dict[str, list[int]] = {}
    for f in files:
        for name, (_dtype, shape) in f.tensors.items():
            comp = families.tower_component(name)
            if comp:
                count = 1
                for d in shape:
                    count *= d
                t = tally.setdefault(comp, [0, 0])
                t[0] += 1
                t[1] += count
    return [{"component": c, "tensors": t, "parameters": p} for c, (t, p) in sorted(tally.items())]


def _save(dst: Path, model, config: dict, tokenizer, src: Path) -> None:
    from mlx_lm.utils import save_config, save_model

    save_model(dst, model, donate_model=True)
    save_config(dict(config), config_path=dst / "config.json")
    tokenizer.save_pretrained(str(dst))
    for name in ("generation_config.json",):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("mlx", "mlx-lm", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def cache_dir() -> Path:
    """Where converted bases live: $MLX_GEMMA_TUNE_CACHE, else ~/.cache/mlx-gemma-tune."""
    import os

    root = os.environ.get("MLX_GEMMA_TUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mlx-gemma-tune")
    return Path(root)


def ensure_base(src: str, quantize: int | None = None, progress: Progress | None = None) -> Path:
    """A loadable base model directory for training (base_dir_for), converted into the cache first
    when it is not there yet."""
    out = base_dir_for(src, quantize)
    if out == Path(src).expanduser() or (out / PROVENANCE_FILE).is_file():
        return out
    convert(src, out, quantize=quantize, force=True, progress=progress)
    return out


def base_dir_for(src: str, quantize: int | None = None) -> Path:
    """Where the base model for (src, quantize) lives, without converting anything: a local directory
    as it is unless it must be quantized first; else a directory of the cache keyed by the source
    (a hub id, or a local checkpoint's path, sizes and times) and the quantization. Raises UserError
    for a base that is already quantized to other bits."""
    import hashlib
    import json as _json

    local = Path(src).expanduser()
    if local.is_dir():
        config = hf_checkpoint.read_config(local)
        families.detect(config, where=str(local / "config.json"))
        have = (config.get("quantization") or {}).get("bits")
        if quantize is None or have == quantize:
            return local
        if have:
            raise UserError(f"the base is already {have}-bit; it cannot be re-quantized to {quantize}-bit",
                            where=str(local), hint="use the original checkpoint, or set model.quantize: null")
        stamp = [str(local.resolve())] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                          for p in sorted(local.glob("*.safetensors"))]
    else:
        stamp = [src]
    key = hashlib.sha256(_json.dumps(stamp + [quantize]).encode()).hexdigest()[:16]
    name = Path(src).name or "model"
    return cache_dir() / "models" / f"{name}-{f'{quantize}bit' if quantize else 'mlx'}-{key}"
