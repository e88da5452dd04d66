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
  to f16, as llama.cpp does). q4_0 / q5_0 / q4_k_m / q5_k_m / q6_k: the f16 file, quantized by
  llama.cpp's own quantizer (gguf_llama_cpp.py).

Only the language model is written; llama.cpp keeps image and audio towers in a separate mmproj
file, which this export does not write. The tokenizer and Modelfile are in gguf_vocab.py.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from mlx_gemma_tune import calibration as calibration_mod
from mlx_gemma_tune import fsio, gguf_llama_cpp, gguf_vocab, hf_checkpoint
from mlx_gemma_tune.errors import OutputError, Progress, UserError
from mlx_gemma_tune.export import ExportResult, to_hf_tensors
from mlx_gemma_tune.gguf_llama_cpp import LLAMA_FTYPES
from mlx_gemma_tune.merge import load_merged

WRITTEN = ("f16", "bf16", "q8_0")  # written here with the gguf package
OUTTYPES = WRITTEN + tuple(LLAMA_FTYPES)  # the rest: an f16 file quantized by llama.cpp's own quantizer
# source model_type -> GGUF architecture
SUPPORTED = {"gemma3_text": "gemma3", "gemma3n": "gemma3n", "gemma3n_text": "gemma3n", "gemma4": "gemma4",
             "gemma4_text": "gemma4"}
REFUSED = {"gemma3": "a multimodal Gemma 3 (Gemma3ForConditionalGeneration) is not exported by this tool yet"}
ALWAYS_F32 = ("ffn_gate_inp.weight", "altup_correct_coef.weight", "altup_predict_coef.weight")


def export_gguf(run_or_fused: str, out: str, *, outtype: str = "f16", base: str | None = None,
                ollama: bool = False, verify: bool = False, calibration: str | None = None, force: bool = False,
                progress: Progress | None = None) -> ExportResult:
    """One .gguf file (and, with ollama, a Modelfile beside it) of a run or fused model.

    outtype: f16 / bf16 / q8_0 are written directly; q4_0 / q5_0 / q4_k_m / q5_k_m / q6_k are an f16
    file quantized by llama.cpp (gguf_llama_cpp.quantize). verify: llama.cpp scores the file (and the
    f16 file it came from) on calibration text (calibration.chunks: the built-in sample, or the
    dataset file `calibration`) beside MLX's merged model: perplexities and top-1 agreement land in
    the result. Raises UserError (unsupported model, llama-cpp-python missing for a llama.cpp
    outtype or verify), OutputError (the output exists, is a directory, is inside the input)."""
    import gguf

    started = time.monotonic()
    say = progress or (lambda _m: None)
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype}")
    if outtype in LLAMA_FTYPES:
        gguf_llama_cpp.require(f"--outtype {outtype}")
    if verify:
        gguf_llama_cpp.require("export --format gguf --verify")
    out_p = Path(out).expanduser().absolute()
    check_output(out_p, force, Path(run_or_fused), ollama)
    arch_name = architecture(run_or_fused, base)  # before the (slow) load and merge
    merged = load_merged(run_or_fused, base, progress)
    source_config = hf_checkpoint.read_config(merged.source)
    text = source_config.get("text_config") or source_config
    if verify:  # MLX's side first, so the merged model can go before llama.cpp loads the file
        say("Scoring the merged MLX model on the calibration text")
        token_chunks, calibration_text = calibration_mod.chunks(merged.tokenizer, calibration)
        mlx_side = calibration_mod.mlx_scores(merged.model, token_chunks)

    from mlx.utils import tree_flatten

    say("Mapping weights to llama.cpp names")
    hf = to_hf_tensors(merged.model_type, dict(tree_flatten(merged.model.parameters())))
    n_tensors = 0

    def write_gguf(path: Path, written: str) -> None:
        nonlocal n_tensors
        tensors = gguf_tensors(arch_name, text, hf, written)
        n_tensors = len(tensors)
        w = gguf.GGUFWriter(str(path), arch_name)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(merged.source.name)
        metadata(w, arch_name, text, written)
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
    reference = None  # the f16 file a llama.cpp quantization starts from / --verify compares with
    try:
        if outtype != "f16" and (outtype in LLAMA_FTYPES or verify):
            reference = fsio.temp_path(out_p.parent, ".f16.gguf")
            say("Writing the f16 file llama.cpp quantizes" if outtype in LLAMA_FTYPES else "Writing an f16 reference")
            write_gguf(reference, "f16")
        if outtype in LLAMA_FTYPES:
            say(f"Quantizing to {outtype} with llama.cpp")
            fsio.atomic_write_with(out_p, lambda tmp: gguf_llama_cpp.quantize(reference, tmp, outtype))
        else:
            say(f"Writing {out_p.name} ({outtype})")
            fsio.atomic_write_with(out_p, lambda tmp: write_gguf(tmp, outtype))
        hf.clear()  # the merged weights are written: free them before llama.cpp loads the file
        result = ExportResult(str(out_p), "gguf", str(merged.source), n_tensors, {}, outtype,
                              size_bytes=out_p.stat().st_size, tensor_types=tensor_types(out_p))
        if verify:
            del merged.model
            say("Scoring the file with llama.cpp")
            f16 = gguf_llama_cpp.score(reference or out_p, token_chunks)
            final = gguf_llama_cpp.score(out_p, token_chunks) if reference else f16
            result.verify_perplexity = {"mlx": mlx_side.perplexity, "f16": f16.perplexity,
                                        outtype: final.perplexity}
            result.verify_top1 = {"f16 vs mlx": f16.agreement(mlx_side)}
            if reference:
                result.verify_top1[f"{outtype} vs f16"] = final.agreement(f16)
            result.verify_tokens, result.verify_text = final.tokens, calibration_text
            result.reference_size_bytes = reference.stat().st_size if reference else result.size_bytes
    finally:
        if reference is not None:
            reference.unlink(missing_ok=True)
    if ollama:
        fsio.atomic_write_text(out_p.parent / "Modelfile", gguf_vocab.modelfile(out_p.name, arch_name))
    result.seconds = round(time.monotonic() - started, 2)
    return result


def tensor_types(path: Path) -> dict[str, int]:
    """{GGML type name: how many tensors} of a GGUF file, e.g. {"Q4_K": 20, "Q6_K": 9, "F32": 21}."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def architecture(run_or_fused: str, base: str | None) -> str:
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


def check_output(out: Path, force: bool, source: Path, ollama: bool) -> None:
    """OutputError unless `out` is a new (or, with force, replaceable) .gguf file outside `source`, with
    room for a Modelfile beside it when ollama."""
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
    import mlx.core as mx
    import numpy as np

    names = _name_map(arch_name, text)
    vocab_size = int(text["vocab_size"])
    out, stacks = {}, {}
    for key in sorted(hf):
        k = _text_key(key)
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


def _name_map(arch_name: str, text: dict):
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    return gguf.get_tensor_name_map(arch, int(text["num_hidden_layers"]))


def _text_key(hf_key: str) -> str:
    """A multimodal checkpoint's text-model key as the text-only model names it (model.language_model. -> model.)."""
    return "model." + hf_key[len("model.language_model."):] if hf_key.startswith("model.language_model.") else hf_key


def tensor_name(arch_name: str, text: dict, hf_key: str) -> str | None:
    """llama.cpp's name for a Hugging Face weight of the text model, e.g. model.layers.3.self_attn.q_proj.weight
    -> blk.3.attn_q.weight (gguf's TensorNameMap); None when llama.cpp has no such tensor."""
    return _name_map(arch_name, text).get_name(_text_key(hf_key), try_suffixes=(".weight", ".bias"))


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
