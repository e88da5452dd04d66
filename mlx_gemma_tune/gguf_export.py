"""GGUF export for llama.cpp / Ollama, written with the `gguf` package (llama.cpp's own writer).

The merged model's Hugging Face tensors (export.to_hf_tensors) are renamed with gguf's
TensorNameMap for the architecture, in the layout llama.cpp's convert_hf_to_gguf.py writes:

- Gemma 3: Gemma's RMSNorm scales by (1 + w), llama.cpp's gemma3 by w, so every norm weight is
  stored plus one. Gemma 3n and Gemma 4 scale by w already: stored as they are.
- Gemma 3n: the three AltUp (un)embedding projections are stacked into one tensor; the token and
  per-layer embeddings are padded with zero rows to vocab_size (the image/audio token ids).
- Gemma 4: a rope_freqs tensor makes the full-attention layers' "proportional" RoPE (only the
  first partial_rotary_factor of each head's pairs rotate); the MoE router and per-expert scales
  become ffn_gate_inp.scale / ffn_down_exps.scale.
- 1-D tensors, norms, scales and the small router / AltUp coefficient matrices stay float32; other
  weights are f16, bf16 or q8_0 (a row length that is not a multiple of the q8_0 block falls back
  to f16, as llama.cpp does).

Only the language model is written; llama.cpp keeps image and audio towers in a separate mmproj
file, which this export does not write. The tokenizer and Modelfile are in gguf_vocab.py.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from mlx_gemma_tune import fsio, gguf_vocab, hf_checkpoint
from mlx_gemma_tune.errors import OutputError, Progress, UserError
from mlx_gemma_tune.export import ExportResult, to_hf_tensors
from mlx_gemma_tune.merge import load_merged

OUTTYPES = ("f16", "bf16", "q8_0")
# source model_type -> GGUF architecture
SUPPORTED = {"gemma3_text": "gemma3", "gemma3n": "gemma3n", "gemma3n_text": "gemma3n", "gemma4": "gemma4",
             "gemma4_text": "gemma4"}
REFUSED = {"gemma3": "a multimodal Gemma 3 (Gemma3ForConditionalGeneration) is not exported by this tool yet"}
ALWAYS_F32 = ("ffn_gate_inp.weight", "altup_correct_coef.weight", "altup_predict_coef.weight")


def export_gguf(run_or_fused: str, out: str, *, outtype: str = "f16", base: str | None = None,
                ollama: bool = False, force: bool = False, progress: Progress | None = None) -> ExportResult:
    """One .gguf file (and, with ollama, a Modelfile beside it) of a run or fused model."""
    import gguf

    started = time.monotonic()
    say = progress or (lambda _m: None)
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype}")
    out_p = Path(out).expanduser().absolute()
    _check_output(out_p, force, Path(run_or_fused), ollama)
    arch_name = _architecture(run_or_fused, base)  # before the (slow) load and merge
    merged = load_merged(run_or_fused, base, progress)
    source_config = hf_checkpoint.read_config(merged.source)
    text = source_config.get("text_config") or source_config

    from mlx.utils import tree_flatten

    say("Mapping weights to llama.cpp names")
    hf = to_hf_tensors(merged.model_type, dict(tree_flatten(merged.model.parameters())))
    tensors = gguf_tensors(arch_name, text, hf, outtype)
    say(f"Writing {out_p.name} ({outtype})")

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch_name)
        w.add_name(merged.source.name)
        metadata(w, arch_name, text, outtype)
        if arch_name == "gemma4":
            gguf_vocab.write_gemma4(w, merged.source, int(text["vocab_size"]))
        else:
            gguf_vocab.write_sentencepiece(w, merged.source, int(text["vocab_size"]))
        for name, (data, qtype) in tensors.items():
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    out_p.parent.mkdir(parents=True, exist_ok=True)
    fsio.atomic_write_with(out_p, write)
    if ollama:
        fsio.atomic_write_text(out_p.parent / "Modelfile", gguf_vocab.modelfile(out_p.name, arch_name))
    return ExportResult(str(out_p), "gguf", str(merged.source), len(tensors), {}, outtype,
                        size_bytes=out_p.stat().st_size, seconds=round(time.monotonic() - started, 2))


def _architecture(run_or_fused: str, base: str | None) -> str:
    """The GGUF architecture for the model behind a run or model directory, or a clear refusal."""
    from mlx_gemma_tune import models, rundir

    base_dir, _ = rundir.resolve_target(run_or_fused)
    source = hf_checkpoint.source_of(models.resolve_model_dir(base_dir), base)
    model_type = hf_checkpoint.read_config(source).get("model_type")
    if model_type in SUPPORTED:
        return SUPPORTED[model_type]
    why = REFUSED.get(model_type, f"the gguf package defines no architecture for model_type '{model_type}'")
    raise UserError(f"GGUF export: {why}", where=str(source),
                    hint="supported: Gemma 3 text, Gemma 3n and Gemma 4 models")


def _check_output(out: Path, force: bool, source: Path, ollama: bool) -> None:
    if out.suffix != ".gguf":
        raise OutputError("must be a file name ending in .gguf", where=str(out))
    if out.is_dir():
        raise OutputError("is a directory", where=str(out), hint="give a file name like model.gguf")
    src = source.expanduser().resolve()
    if src == out.resolve().parent or src in out.resolve().parents:
        raise OutputError("is inside the input directory", where=str(out), hint="write the GGUF file elsewhere")
    for target in [out] + ([out.parent / "Modelfile"] if ollama else []):
        if target.exists() and not force:
            raise OutputError("already exists", where=str(target), hint="pass --force to replace it")
    fsio.check_output_dir(out.parent, force=True)  # the folder can be created and written


def llama_cpp_layout(arch_name: str, text: dict, hf: dict) -> dict:
    """{gguf name: float32 numpy array}: the HF text-model tensors renamed and reshaped as llama.cpp reads them."""
    import gguf
    import mlx.core as mx
    import numpy as np

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, int(text["num_hidden_layers"]))
    vocab_size = int(text["vocab_size"])
    out, stacks = {}, {}
    for key in sorted(hf):
        k = "model." + key[len("model.language_model."):] if key.startswith("model.language_model.") else key
        data = np.array(hf[key].astype(mx.float32))
        block = re.search(r"\.layers\.(\d+)\.", k)
        if arch_name == "gemma3" and k.endswith("norm.weight"):
            data = data + 1.0  # Gemma 3's RMSNorm multiplies by (1 + w); llama.cpp's gemma3 by w
        elif arch_name == "gemma3n":
            stacked = re.fullmatch(r"model\.(altup_projections|altup_unembed_projections)\.(\d+)\.weight", k)
            if stacked:
                stacks.setdefault(stacked.group(1), {})[int(stacked.group(2))] = data
                continue
            if k.endswith("_scale"):
                k += ".weight"
            if k.endswith(("embed_tokens.weight", "embed_tokens_per_layer.weight")) and len(data) < vocab_size:
                data = np.concatenate([data, np.zeros((vocab_size - len(data), data.shape[1]), data.dtype)])
        elif arch_name == "gemma4":
            if k.endswith("router.scale"):
                out[f"blk.{block.group(1)}.ffn_gate_inp.scale"] = data
                continue
            if k.endswith("router.per_expert_scale"):
                out[f"blk.{block.group(1)}.ffn_down_exps.scale"] = data
                continue
            if k.endswith(("per_dim_scale", "layer_scalar")) or (".experts." in k and not k.endswith(".weight")):
                k += ".weight"
        name = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"internal: no llama.cpp name for tensor '{key}'; please report this")
        out[name] = data
    for hf_name, parts in stacks.items():  # gemma3n: projections 0..2 -> one (3, H, H) tensor
        name = names.get_name(f"model.{hf_name}.weight", try_suffixes=(".weight",))
        out[name] = np.stack([parts[i] for i in sorted(parts)])
    if arch_name == "gemma4":
        out["rope_freqs.weight"] = gemma4_rope_freqs(text)
    return out


def gemma4_rope_freqs(text: dict):
    """Frequency factors for Gemma 4's full-attention layers: 1 for the pairs that rotate, 1e30 (no
    rotation) for the rest, since llama.cpp's NeoX RoPE cannot skip the middle of a head otherwise."""
    import numpy as np

    full = (text.get("rope_parameters") or {}).get("full_attention") or {}
    head_dim = int(text.get("global_head_dim") or text["head_dim"])
    rotated = int(head_dim * float(full.get("partial_rotary_factor", 1.0)) / 2)
    return np.array([1.0] * rotated + [1e30] * (head_dim // 2 - rotated), dtype=np.float32)


def gguf_tensors(arch_name: str, text: dict, hf: dict, outtype: str) -> dict:
    """{gguf name: (numpy data, GGMLQuantizationType)} in llama.cpp's layout and types."""
    import gguf
    import numpy as np

    q = gguf.GGMLQuantizationType
    out = {}
    for name, data in llama_cpp_layout(arch_name, text, hf).items():
        if (data.ndim <= 1 or name.endswith(("_norm.weight",) + ALWAYS_F32) or not name.endswith(".weight")):
            out[name] = (data.astype(np.float32), q.F32)
        elif outtype == "f16":
            out[name] = (data.astype(np.float16), q.F16)
        else:
            qtype = q.BF16 if outtype == "bf16" else q.Q8_0
            try:
                out[name] = (gguf.quants.quantize(data, qtype), qtype)
            except gguf.QuantError:  # the row length is not a multiple of the block size
                out[name] = (data.astype(np.float16), q.F16)
    return out


def metadata(w, arch_name: str, text: dict, outtype: str) -> None:
    """The hyperparameters llama.cpp reads for the architecture (convert_hf_to_gguf.py's keys)."""
    import gguf

    n_layers = int(text["num_hidden_layers"])
    head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    ffn = text["intermediate_size"]
    swa = [t == "sliding_attention" for t in text.get("layer_types") or []]
    n_kv = int(text.get("num_key_value_heads") or text["num_attention_heads"])
    w.add_context_length(int(text.get("max_position_embeddings", 131072)))
    w.add_embedding_length(int(text["hidden_size"]))
    w.add_block_count(n_layers)
    w.add_head_count(int(text["num_attention_heads"]))
    w.add_layer_norm_rms_eps(float(text.get("rms_norm_eps", 1e-6)))
    w.add_rope_freq_base(_rope_theta(text, "full_attention", "rope_theta", 1_000_000.0))
    w.add_rope_freq_base_swa(_rope_theta(text, "sliding_attention", "rope_local_base_freq", 10_000.0))
    if text.get("sliding_window") and text.get("sliding_window_pattern") != 1:
        w.add_sliding_window(int(text["sliding_window"]))
    if text.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(text["final_logit_softcapping"]))
    scaling = text.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear" and scaling.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    if arch_name == "gemma4":
        shared = int(text.get("num_kv_shared_layers") or 0)
        if text.get("use_double_wide_mlp"):  # the KV-sharing layers have twice the MLP width
            ffn = [int(ffn) * (2 if i >= n_layers - shared else 1) for i in range(n_layers)]
        if text.get("num_global_key_value_heads"):
            n_kv = [n_kv if s else int(text["num_global_key_value_heads"]) for s in swa]
        global_dim = int(text.get("global_head_dim") or head_dim)
        w.add_key_length(global_dim)
        w.add_value_length(global_dim)
        w.add_key_length_swa(head_dim)
        w.add_value_length_swa(head_dim)
        w.add_rope_dimension_count(global_dim)  # the rope_freqs tensor stops the unrotated pairs
        w.add_rope_dimension_count_swa(head_dim)
        w.add_shared_kv_layers(shared)
        w.add_embedding_length_per_layer_input(int(text.get("hidden_size_per_layer_input") or 0))
        w.add_sliding_window_pattern(swa)
        if text.get("num_experts"):
            w.add_expert_count(int(text["num_experts"]))
            w.add_expert_used_count(int(text["top_k_experts"]))
            w.add_expert_feed_forward_length(int(text["moe_intermediate_size"]))
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch_name == "gemma3n":
        w.add_altup_active_idx(int(text["altup_active_idx"]))
        w.add_altup_num_inputs(int(text["altup_num_inputs"]))
        w.add_embedding_length_per_layer_input(int(text["hidden_size_per_layer_input"]))
        w.add_shared_kv_layers(int(text["num_kv_shared_layers"]))
        w.add_activation_sparsity_scale([_std_multiplier(p) for p in text["activation_sparsity_pattern"]])
        w.add_sliding_window_pattern(swa)
    w.add_feed_forward_length(ffn if isinstance(ffn, int) else [int(f) for f in ffn])
    w.add_head_count_kv(n_kv)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _std_multiplier(p: float) -> float:
    """Gemma 3n's activation sparsity as a standard-normal quantile (the standard deviations above
    the mean under which activations are zeroed); 0 sparsity is minus infinity."""
    from statistics import NormalDist

    return float("-inf") if p <= 0 else NormalDist().inv_cdf(p)


def _rope_theta(text: dict, layer_type: str, old_key: str, default: float) -> float:
    """A RoPE base from an older config (rope_theta / rope_local_base_freq) or rope_parameters[layer_type]."""
    params = text.get("rope_parameters") or {}
    if isinstance(params.get(layer_type), dict) and params[layer_type].get("rope_theta"):
        return float(params[layer_type]["rope_theta"])
    if layer_type == "full_attention" and params.get("rope_theta") and not isinstance(params.get("rope_theta"), dict):
        return float(params["rope_theta"])
    return float(text.get(old_key) or default)
