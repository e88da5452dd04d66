"""GGUF export for llama.cpp / Ollama, written with the `gguf` package (llama.cpp's own writer).

The merged model's Hugging Face tensors (export.to_hf_tensors) are renamed with gguf's
TensorNameMap for the architecture, with the layout llama.cpp's convert_hf_to_gguf.py writes:
Gemma's RMSNorm scales by (1 + w), llama.cpp's by w, so every norm weight is stored plus one;
1-D tensors stay float32; 2-D weights are f16, bf16 or q8_0 (a row length that is not a multiple
of the q8_0 block falls back to f16, as llama.cpp does). The tokenizer is stored as llama.cpp's
SentencePiece-style vocabulary ("llama"): every token in id order, a score per token (for a BPE
tokenizer.json: minus the rank of the merge that builds it, so merges happen in the same order),
token types (control / user-defined / byte / normal), the special ids and the chat template.

Architectures: Gemma 3 (text). The `gguf` package also defines gemma3n and gemma4; their extra
tensors and metadata are not written yet, so those are refused by name (export --format hf and
llama.cpp's convert_hf_to_gguf.py are the way there meanwhile).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlx_gemma_tune import checkpoint, fsio
from mlx_gemma_tune.errors import OutputError, UserError
from mlx_gemma_tune.export import ExportResult, Progress, load_merged, to_hf_tensors

OUTTYPES = ("f16", "bf16", "q8_0")
SUPPORTED = {"gemma3_text": "gemma3"}  # source model_type -> GGUF architecture
DEFINED_LATER = {"gemma3n": "gemma3n", "gemma3n_text": "gemma3n", "gemma4": "gemma4", "gemma4_text": "gemma4",
                 "gemma3": "gemma3"}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


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
    source_config = checkpoint.read_config(merged.source)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)

    from mlx.utils import tree_flatten

    say("Mapping weights to llama.cpp names")
    hf = to_hf_tensors(merged.model_type, dict(tree_flatten(merged.model.parameters())))
    text = source_config.get("text_config") or source_config
    tensors = gguf_tensors(arch, int(text["num_hidden_layers"]), hf, outtype)
    say(f"Writing {out_p.name} ({outtype})")

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch_name)
        _metadata(w, text, outtype, merged.source.name)
        _tokenizer(w, merged.source, int(text["vocab_size"]))
        for name, (data, qtype) in tensors.items():
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    out_p.parent.mkdir(parents=True, exist_ok=True)
    fsio.atomic_write_with(out_p, write)
    if ollama:
        fsio.atomic_write_text(out_p.parent / "Modelfile", modelfile(out_p.name))
    return ExportResult(str(out_p), "gguf", str(merged.source), len(tensors), {}, outtype,
                        size_bytes=out_p.stat().st_size, seconds=round(time.monotonic() - started, 2))


def _architecture(run_or_fused: str, base: str | None) -> str:
    """The GGUF architecture for the model behind a run or model directory, or a clear refusal."""
    from mlx_gemma_tune import export, generate, models

    base_dir, _ = generate.resolve_target(run_or_fused)
    source = export._source_of(models.resolve_model_dir(base_dir), base)
    model_type = checkpoint.read_config(source).get("model_type")
    if model_type in SUPPORTED:
        return SUPPORTED[model_type]
    later = DEFINED_LATER.get(model_type)
    why = (f"GGUF export of {later} ('{model_type}') is not implemented yet" if later else
           f"the gguf package defines no architecture for model_type '{model_type}'")
    raise UserError(why, where=str(source), hint="supported: Gemma 3 text models (gemma3_text); "
                    "export --format hf and use llama.cpp's convert_hf_to_gguf.py meanwhile")


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


def gguf_tensors(arch, n_layers: int, hf: dict, outtype: str) -> dict:
    """{gguf name: (numpy data, GGMLQuantizationType)} in llama.cpp's layout."""
    import gguf
    import mlx.core as mx
    import numpy as np

    names = gguf.get_tensor_name_map(arch, n_layers)
    q = gguf.GGMLQuantizationType
    out = {}
    for key in sorted(hf):
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"internal: no llama.cpp name for tensor '{key}'; please report this")
        data = np.array(hf[key].astype(mx.float32))
        if key.endswith("norm.weight"):
            data = data + 1.0  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by w
        if data.ndim == 1:
            out[name] = (data, q.F32)
        elif outtype == "f16":
            out[name] = (data.astype(np.float16), q.F16)
        else:
            qtype = q.BF16 if outtype == "bf16" else q.Q8_0
            try:
                out[name] = (gguf.quants.quantize(data, qtype), qtype)
            except gguf.QuantError:  # the row length is not a multiple of the block size
                out[name] = (data.astype(np.float16), q.F16)
    return out


def _metadata(w, text: dict, outtype: str, name: str) -> None:
    import gguf

    head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    w.add_name(name)
    w.add_context_length(int(text.get("max_position_embeddings", 131072)))
    w.add_embedding_length(int(text["hidden_size"]))
    w.add_block_count(int(text["num_hidden_layers"]))
    w.add_feed_forward_length(int(text["intermediate_size"]))
    w.add_head_count(int(text["num_attention_heads"]))
    w.add_head_count_kv(int(text.get("num_key_value_heads") or text["num_attention_heads"]))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
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
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_theta(text: dict, layer_type: str, old_key: str, default: float) -> float:
    """A RoPE base from an older config (rope_theta / rope_local_base_freq) or rope_parameters[layer_type]."""
    params = text.get("rope_parameters") or {}
    if isinstance(params.get(layer_type), dict) and params[layer_type].get("rope_theta"):
        return float(params[layer_type]["rope_theta"])
    if layer_type == "full_attention" and params.get("rope_theta") and not isinstance(params.get("rope_theta"), dict):
        return float(params["rope_theta"])
    return float(text.get(old_key) or default)


def vocabulary(source: Path, vocab_size: int | None = None) -> dict:
    """tokens, scores, token types, special ids and chat template from a Hugging Face tokenizer.

    The list is padded to the model's vocab_size with "[PAD<id>]" entries (unused, score -10000),
    as llama.cpp's converter does, so that it matches the embedding's rows.
    """
    tok = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok["model"]
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export needs a BPE tokenizer.json, this one is {model.get('type')}",
                        where=str(source / "tokenizer.json"))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    size = max(max(vocab.values()) + 1, vocab_size or 0)
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, i in vocab.items():
        tokens[i] = text
    rank: dict[str, int] = {}
    for r, merge in enumerate(model.get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, r)
    scores, types = [], []
    known = set(vocab.values())
    for i, text in enumerate(tokens):
        if i not in known:
            types.append(UNUSED)
            scores.append(-10000.0)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(BYTE)
            scores.append(0.0)
        elif i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
            scores.append(-1000.0)
        else:
            types.append(NORMAL)
            scores.append(-float(rank.get(text, len(rank))))
    cfg = _json(source / "tokenizer_config.json")
    model_cfg = _json(source / "config.json")
    special = {}
    for key in ("bos", "eos", "unk", "pad"):
        t = cfg.get(f"{key}_token")
        t = t.get("content") if isinstance(t, dict) else t
        if t in vocab:
            special[key] = vocab[t]
        else:  # from config.json (a single id; a list of eos ids is not one token)
            i = model_cfg.get(f"{key}_token_id", (model_cfg.get("text_config") or {}).get(f"{key}_token_id"))
            if isinstance(i, int):
                special[key] = i
    if "unk" in special:
        types[special["unk"]] = UNKNOWN if special["unk"] not in added else types[special["unk"]]
    template = cfg.get("chat_template")
    if (source / "chat_template.jinja").is_file():
        template = (source / "chat_template.jinja").read_text(encoding="utf-8")
    return {"tokens": tokens, "scores": scores, "types": types, "special": special, "chat_template": template,
            "add_bos": bool(cfg.get("add_bos_token", True)), "add_eos": bool(cfg.get("add_eos_token", False))}


def _tokenizer(w, source: Path, vocab_size: int) -> None:
    v = vocabulary(source, vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(v["tokens"])
    w.add_token_scores(v["scores"])
    w.add_token_types(v["types"])
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
              "pad": w.add_pad_token_id}
    for key, i in v["special"].items():
        adders[key](i)
    w.add_add_bos_token(v["add_bos"])
    w.add_add_eos_token(v["add_eos"])
    w.add_add_space_prefix(False)
    if v["chat_template"]:
        w.add_chat_template(v["chat_template"])


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# Gemma 3's turn format as an Ollama (Go) template: a system prompt goes in front of the first user turn,
# as Gemma's own chat template does.
GEMMA3_OLLAMA_TEMPLATE = """{{- $system := "" }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""


def modelfile(gguf_name: str) -> str:
    """An Ollama Modelfile for the GGUF file beside it: Gemma's chat template and stop tokens."""
    return (f"# Ollama: ollama create NAME -f Modelfile && ollama run NAME\n"
            f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{GEMMA3_OLLAMA_TEMPLATE}"""\n'
            'PARAMETER stop "<end_of_turn>"\n'
            'PARAMETER stop "<eos>"\n')
