"""A PEFT adapter from a run: `peft.PeftModel.from_pretrained(original_model, OUT)` loads it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlx_gemma_tune import fsio, hf_checkpoint
from mlx_gemma_tune.errors import InputError, UserError
from mlx_gemma_tune.export import ExportResult, hf_prefixes, to_hf_key
from mlx_gemma_tune.hf_checkpoint import source_of


def export_peft(run_dir: str, out: str, *, base: str | None = None, force: bool = False) -> ExportResult:
    """adapter_model.safetensors + adapter_config.json that peft.PeftModel loads on the original model."""
    import mlx.core as mx

    from mlx_gemma_tune import lora, models, rundir

    started = time.monotonic()
    out_p = Path(out).expanduser()
    fsio.check_output_dir(out_p, force=force, inputs=(Path(run_dir),))
    base_dir, adapter = rundir.resolve_target(run_dir)
    if adapter is None:
        raise InputError("is not a run directory with an adapter", where=str(run_dir),
                         hint="PEFT export takes the directory `mlx-gemma-tune train` wrote")
    base_dir = models.resolve_model_dir(base_dir)
    source = source_of(base_dir, base)
    source_config = hf_checkpoint.read_config(source)
    model_type = source_config["model_type"]
    hf_prefixes(model_type)
    settings = lora.settings_of(adapter)
    if settings.experts or any(".experts." in m for m in settings.modules):
        raise UserError("adapters on MoE experts have no PEFT equivalent (transformers keeps the experts as fused "
                        "3-D parameters)", where=str(run_dir), hint="use --format hf for a merged checkpoint")
    if any(m.startswith("embed_vision.") for m in settings.modules):
        raise UserError("PEFT export of an adapter on the vision projector is not supported yet", where=str(run_dir),
                        hint="use --format hf for a merged checkpoint (it merges the projector too)")
    weights = hf_checkpoint.load_safetensors(adapter / lora.ADAPTER_WEIGHTS)
    tensors, targets = {}, []
    for path in settings.modules:
        hf_path = to_hf_key(model_type, path + ".weight")[: -len(".weight")]
        targets.append(hf_path)
        key = f"base_model.model.{hf_path}"
        tensors[f"{key}.lora_A.weight"] = weights[f"{path}.lora_a"].T
        tensors[f"{key}.lora_B.weight"] = weights[f"{path}.lora_b"].T
        if settings.method == "dora":
            tensors[f"{key}.lora_magnitude_vector"] = weights[f"{path}.m"]
    prov = (json.loads((base_dir / "provenance.json").read_text())["source"]
            if (base_dir / "provenance.json").is_file() else {})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank, "lora_alpha": settings.scale * settings.rank,
        "lora_dropout": settings.dropout, "target_modules": sorted(targets), "use_dora": settings.method == "dora",
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": prov.get("repo_id") or str(source), "modules_to_save": None,
    }
    with fsio.staged_dir(out_p) as tmp:
        mx.save_safetensors(str(tmp / "adapter_model.safetensors"),
                            {k: mx.contiguous(v) for k, v in tensors.items()}, metadata={"format": "pt"})
        fsio.atomic_write_json(tmp / "adapter_config.json", peft_config)
    return ExportResult(str(out_p), "peft", str(source), len(tensors), size_bytes=fsio.dir_size(out_p),
                        seconds=round(time.monotonic() - started, 2))
