"""Merging a run's adapter into its base, in full precision (load_merged: every export starts here; fuse:
an MLX model directory, optionally re-quantized, with the error shown)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_gemma_tune import fsio, hf_checkpoint
from mlx_gemma_tune.errors import InputError, Progress, UserError


@dataclass
class Merged:
    model: object
    tokenizer: object
    config: dict  # MLX config (no quantization keys)
    source: Path  # the original Hugging Face checkpoint
    model_type: str  # the source's model_type
    adapter: Path | None
    fused_layers: int
    base: Path


def fuse_in_place(model) -> int:
    """Replace every LoRA/DoRA layer by its full-precision merge; returns how many."""
    from mlx.utils import tree_unflatten

    fused = [(p, m.fuse(dequantize=True)) for p, m in model.named_modules() if "lora_a" in m and hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def load_merged(run_or_model: str, base: str | None = None, progress: Progress | None = None) -> Merged:
    """A run's base + adapter merged in full precision, or an already fused model, dequantized."""
    from mlx_lm.utils import dequantize_model

    from mlx_gemma_tune import lora, models, rundir

    say = progress or (lambda _m: None)
    base_dir, adapter = rundir.resolve_target(run_or_model)
    base_dir = models.resolve_model_dir(base_dir)  # (a run without an adapter was refused just above)
    source = hf_checkpoint.source_of(base_dir, base)
    source_config = hf_checkpoint.read_config(source)
    say("Loading the model")
    model, tokenizer, config = models.load(base_dir)
    n = 0
    if adapter is not None:
        lora.load(model, config, adapter)
        say("Merging the adapter in full precision")
        n = fuse_in_place(model)
    model = dequantize_model(model)
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    return Merged(model, tokenizer, config, source, source_config["model_type"], adapter, n, base_dir)



@dataclass
class FuseResult:
    output: str
    adapter: str | None
    fused_layers: int
    quantized_base: bool
    requantized_bits: int | None
    deviation: dict | None  # requantization error against the full-precision merge (weights; perplexity on
    # calibration.SAMPLE before / after, greedy agreement)
    size_bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def fuse(run_dir: str, out: str, *, requantize: int | None = None, group_size: int = 64, force: bool = False,
         base: str | None = None, progress: Progress | None = None) -> FuseResult:
    """Merge a run's adapter into its base in full precision and write an MLX model directory."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import quantize_model, save_config, save_model

    started = time.monotonic()
    out_p = Path(out).expanduser()
    fsio.check_output_dir(out_p, force=force, inputs=(Path(run_dir),))
    if requantize not in (None, 4, 8):
        raise UserError(f"--requantize must be 4 or 8, not {requantize}")
    merged = load_merged(run_dir, base, progress)
    if merged.adapter is None:
        raise InputError("is not a run directory with an adapter", where=str(run_dir),
                         hint="fuse takes the directory `mlx-gemma-tune train` wrote")
    base_config = hf_checkpoint.read_config(merged.base)
    quantized_base = "quantization" in base_config
    deviation = None
    config = merged.config
    if requantize:
        import contextlib
        import io

        from mlx_gemma_tune import calibration

        full = dict(tree_flatten(merged.model.parameters()))
        adapted = {p for p in lora_module_paths(merged.adapter)}
        chunks, text = calibration.chunks(merged.tokenizer)  # what re-quantizing costs the merged model
        before = calibration.mlx_scores(merged.model, chunks)
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(merged.model, config, group_size, requantize,
                                           quant_predicate=getattr(merged.model, "quant_predicate", None))
        after = calibration.mlx_scores(model, chunks)
        deviation = _requant_deviation(model, full, adapted) | {
            "perplexity_merged": before.perplexity, "perplexity_requantized": after.perplexity,
            "top1_agreement": after.agreement(before), "text": text}
        merged.model = model
    with fsio.staged_dir(out_p) as tmp:
        save_model(tmp, merged.model, donate_model=True)
        save_config(dict(config), config_path=tmp / "config.json")
        merged.tokenizer.save_pretrained(str(tmp))
        if (merged.base / "generation_config.json").is_file():
            shutil.copyfile(merged.base / "generation_config.json", tmp / "generation_config.json")
        prov = json.loads((merged.base / "provenance.json").read_text()) if (merged.base / "provenance.json").is_file() \
            else {"source": {"path": str(merged.source.resolve())}, "original_config": hf_checkpoint.read_config(merged.source)}
        prov["fused"] = {"adapter": str(merged.adapter), "base": str(merged.base), "layers": merged.fused_layers,
                         "requantized_bits": requantize, "deviation": deviation}
        fsio.atomic_write_json(tmp / "provenance.json", prov)
    mx.clear_cache()
    return FuseResult(str(out_p), str(merged.adapter), merged.fused_layers, quantized_base, requantize, deviation,
                      fsio.dir_size(out_p), round(time.monotonic() - started, 2))


def lora_module_paths(adapter_dir: Path) -> list[str]:
    from mlx_gemma_tune import lora

    cfg = lora.read_config(Path(adapter_dir))
    return list((cfg.get("mlx_gemma_tune") or {}).get("modules") or [])


def _requant_deviation(model, full: dict, adapted: set[str]) -> dict:
    """How far re-quantized merged weights are from the full-precision merge (adapted layers)."""
    import mlx.core as mx

    worst, total_err, total_norm = 0.0, 0.0, 0.0
    modules = dict(model.named_modules())
    for path in adapted:
        m = modules.get(path)
        if m is None or not hasattr(m, "scales"):
            continue
        w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits, m.mode)
        ref = full[path + ".weight"]
        err = (w.astype(mx.float32) - ref.astype(mx.float32))
        worst = max(worst, float(mx.abs(err).max()))
        total_err += float(mx.sum(err * err))
        total_norm += float(mx.sum(ref.astype(mx.float32) ** 2))
    rel = (total_err / total_norm) ** 0.5 if total_norm else 0.0
    return {"max_abs": worst, "relative_rms": rel}
