"""A run's LoRA adapter as a llama.cpp LoRA adapter GGUF, for `llama-cli --lora` and Ollama's ADAPTER.

The layout is the one llama.cpp's convert_lora_to_gguf.py writes and src/llama-adapter.cpp reads:
general.type "adapter", adapter.type "lora", adapter.lora.alpha (float32) and, per adapted
weight W named as in the base GGUF (blk.N.attn_q.weight, ...), two tensors `W.lora_a` (PEFT's A,
rank x in) and `W.lora_b` (PEFT's B, out x rank). llama.cpp adds scale * alpha / rank * B A x,
with rank read from lora_b; alpha = mlx-lm's scale * rank gives mlx-lm's scale * (x a) b exactly.

DoRA (a per-column magnitude that rescales the merged weight), adapters on MoE experts and on the
vision projector have no llama.cpp adapter form: refused with the merged GGUF as the way out.
`ollama=True` writes the base model's GGUF (reused when it is already there) and a Modelfile with
FROM base + ADAPTER adapter.
"""

from __future__ import annotations

import time
from pathlib import Path

from mlx_gemma_tune import fsio, gguf_vocab, hf_checkpoint
from mlx_gemma_tune.errors import InputError, OutputError, Progress, UserError
from mlx_gemma_tune.export import ExportResult, to_hf_key

MERGED_INSTEAD = "export the merged model instead: --format gguf"


def export_gguf_lora(run_dir: str, out: str, *, base: str | None = None, ollama: bool = False,
                     outtype: str = "f16", force: bool = False, progress: Progress | None = None) -> ExportResult:
    """adapter GGUF `out` (float32 tensors) for the run's adapter on its base model's GGUF.

    ollama: also the base's GGUF beside it (`<source name>-<outtype>.gguf`, written by
    gguf_export.export_gguf with `outtype`, reused when present and of the same architecture) and a
    Modelfile (FROM base, ADAPTER adapter, the family's template and stops). Raises InputError (not
    a run), UserError (DoRA, expert or projector adapters, unsupported model), OutputError."""
    import gguf

    from mlx_gemma_tune import gguf_export, lora, models, rundir

    started = time.monotonic()
    say = progress or (lambda _m: None)
    out_p = Path(out).expanduser().absolute()
    gguf_export.check_output(out_p, force, Path(run_dir), ollama)
    base_dir, adapter = rundir.resolve_target(run_dir)
    if adapter is None:
        raise InputError("is not a run directory with an adapter", where=str(run_dir),
                         hint="--format gguf-lora takes the directory `mlx-gemma-tune train` wrote")
    arch_name = gguf_export.architecture(run_dir, base)
    base_dir = models.resolve_model_dir(base_dir)
    source = hf_checkpoint.source_of(base_dir, base)
    source_config = hf_checkpoint.read_config(source)
    text = source_config.get("text_config") or source_config
    settings = lora.settings_of(adapter)
    why = ("DoRA rescales each merged weight by a learned magnitude, which llama.cpp adapters cannot express"
           if settings.method == "dora" else
           "llama.cpp has no LoRA form for adapters on MoE experts" if settings.experts
           or any(".experts." in m for m in settings.modules) else
           "the GGUF export is the text model only (no vision projector)"
           if any(m.startswith("embed_vision.") for m in settings.modules) else None)
    if why:
        raise UserError(f"--format gguf-lora: {why}", where=str(run_dir), hint=MERGED_INSTEAD)
    weights = hf_checkpoint.load_safetensors(adapter / lora.ADAPTER_WEIGHTS)
    tensors = {}
    for path in settings.modules:
        name = gguf_export.tensor_name(arch_name, text, to_hf_key(source_config["model_type"], path + ".weight"))
        if name is None:
            raise UserError(f"internal: no llama.cpp name for the adapted module '{path}'; please report this")
        tensors[name + ".lora_a"] = _numpy(weights[f"{path}.lora_a"].T)  # (rank, in)
        tensors[name + ".lora_b"] = _numpy(weights[f"{path}.lora_b"].T)  # (out, rank)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch_name)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(f"{Path(run_dir).name} (LoRA on {source.name})")
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(settings.scale * settings.rank))
        for name in sorted(tensors):
            w.add_tensor(name, tensors[name], raw_dtype=gguf.GGMLQuantizationType.F32)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    base_gguf = out_p.parent / f"{source.name}-{outtype}.gguf"
    reuse = ollama and base_gguf.exists()
    if reuse:  # checked before anything is written
        _check_reused_base(base_gguf, arch_name, text)
    say(f"Writing {out_p.name}")
    out_p.parent.mkdir(parents=True, exist_ok=True)
    fsio.atomic_write_with(out_p, write)
    result = ExportResult(str(out_p), "gguf-lora", str(source), len(tensors), {}, "f32",
                          size_bytes=out_p.stat().st_size)
    if ollama:
        if reuse:
            result.base_gguf = f"{base_gguf} (reused)"
        else:
            say(f"Writing the base model's GGUF ({outtype})")
            gguf_export.export_gguf(str(base_dir), str(base_gguf), outtype=outtype, base=base, progress=progress)
            result.base_gguf = str(base_gguf)
        fsio.atomic_write_text(out_p.parent / "Modelfile",
                               gguf_vocab.modelfile(base_gguf.name, arch_name, adapter=out_p.name))
    result.seconds = round(time.monotonic() - started, 2)
    return result


def _numpy(x):
    import mlx.core as mx
    import numpy as np

    return np.array(x.astype(mx.float32))


def _check_reused_base(path: Path, arch_name: str, text: dict) -> None:
    """A base GGUF already beside the adapter must be a model of the same architecture and depth."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.get_field("general.architecture")
        arch = field.contents() if field is not None else None
        blocks = reader.get_field(f"{arch}.block_count")
        n = int(blocks.contents()) if blocks is not None else None
    except (ValueError, OSError) as e:
        raise OutputError(f"is there but is not a readable GGUF file ({e})", where=str(path),
                          hint="remove it, and the export writes the base model's GGUF there") from None
    if arch != arch_name or n != int(text["num_hidden_layers"]):
        raise OutputError(f"is there but is a different model ({arch}, {n} layers; this run's base: {arch_name}, "
                          f"{text['num_hidden_layers']} layers)", where=str(path),
                          hint="remove it or write the adapter to another folder")
