"""The tokenizer and chat format of a GGUF export, in the layout llama.cpp reads for each Gemma.

Gemma 3 and Gemma 3n: llama.cpp's SentencePiece-style vocabulary ("llama"): every token in id
order, a score per token (from a BPE tokenizer.json: minus the rank of the merge that builds it, so
merges happen in the same order), token types (control / user-defined / byte / normal), the special
ids and the chat template. Gemma 4: llama.cpp's "gemma4" BPE vocabulary: the tokens, the merge
list itself, score -1000 for every token, control types for the tokenizer's special tokens, and
the channel / tool-call markers user-defined so that they are always printed (as llama.cpp's
convert_hf_to_gguf.py writes them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlx_gemma_tune.errors import UserError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Gemma 4 markers that llama.cpp's chat parser must see in the output, so never hidden as control tokens
GEMMA4_VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                  "<tool_response|>", '<|"|>'}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _tokenizer_json(source: Path) -> dict:
    tok = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    if tok["model"].get("type") != "BPE":
        raise UserError(f"GGUF export needs a BPE tokenizer.json, this one is {tok['model'].get('type')}",
                        where=str(source / "tokenizer.json"))
    return tok


def _token_list(tok: dict, vocab_size: int | None) -> tuple[list[str], dict[str, int], dict[int, dict]]:
    """Tokens in id order, padded to vocab_size with "[PAD<id>]" (as llama.cpp's converter pads)."""
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    size = max(max(vocab.values()) + 1, vocab_size or 0)
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, i in vocab.items():
        tokens[i] = text
    return tokens, vocab, added


def vocabulary(source: Path, vocab_size: int | None = None) -> dict:
    """Gemma 3 / 3n: tokens, scores, token types, special ids and chat template, SentencePiece-style.

    Tokens past the tokenizer's own (up to the model's vocab_size) are unused, score -10000.
    """
    tok = _tokenizer_json(source)
    tokens, vocab, added = _token_list(tok, vocab_size)
    rank: dict[str, int] = {}
    for r, merge in enumerate(tok["model"].get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, r)
    scores, types = [], []
    known = set(vocab.values())
    for i, text in enumerate(tokens):
        if i not in known:
            types.append(UNUSED)
            scores.append(-10000.0)
        elif _BYTE_TOKEN.fullmatch(text):
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


def write_sentencepiece(w, source: Path, vocab_size: int) -> None:
    """Gemma 3 / 3n tokenizer metadata ("llama")."""
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


def gemma4_types(source: Path, vocab_size: int | None = None) -> tuple[list[str], list[int]]:
    """Gemma 4 tokens and types: byte, control (the tokenizer's special tokens), user-defined (added
    tokens that are not special, and GEMMA4_VISIBLE), normal; padding past the tokenizer unused."""
    from transformers import AutoTokenizer

    tok = _tokenizer_json(source)
    tokens, vocab, _ = _token_list(tok, vocab_size)
    hf = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    special_ids = set(hf.all_special_ids)
    base = len(tok["model"]["vocab"])
    known = set(vocab.values())
    types = []
    for i, text in enumerate(tokens):
        if i not in known:
            types.append(UNUSED)
        elif text in GEMMA4_VISIBLE:
            types.append(USER_DEFINED)
        elif _BYTE_TOKEN.fullmatch(text):
            types.append(BYTE)
        elif i in special_ids:
            types.append(CONTROL)
        else:
            types.append(USER_DEFINED if i >= base else NORMAL)
    return tokens, types


def write_gemma4(w, source: Path, vocab_size: int) -> None:
    """Gemma 4 tokenizer metadata ("gemma4": BPE with its merges), bos always added."""
    import gguf

    tokens, types = gemma4_types(source, vocab_size)
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores([-1000.0] * len(tokens))
    w.add_token_types(types)
    special = gguf.SpecialVocab(source, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise UserError("tokenizer.json has no BPE merges, which llama.cpp's Gemma 4 tokenizer needs",
                        where=str(source / "tokenizer.json"))
    special.add_special_token["bos"] = True  # Gemma 4 always starts with <bos>
    special.add_to_gguf(w, quiet=True)
    w.add_add_space_prefix(False)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# Gemma 3 / 3n turns as an Ollama (Go) template: a system prompt goes in front of the first user
# turn, as Gemma 3's own chat template does.
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

# Gemma 4 turns: the system prompt is a turn of its own.
GEMMA4_OLLAMA_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}<|turn>system
{{ .Content }}<turn|>
{{ else if eq .Role "user" }}<|turn>user
{{ .Content }}<turn|>
{{ if $last }}<|turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<|turn>model
{{ .Content }}{{ if not $last }}<turn|>
{{ end }}
{{- end }}
{{- end }}"""

OLLAMA = {"gemma3": (GEMMA3_OLLAMA_TEMPLATE, ("<end_of_turn>", "<eos>")),
          "gemma3n": (GEMMA3_OLLAMA_TEMPLATE, ("<end_of_turn>", "<eos>")),
          "gemma4": (GEMMA4_OLLAMA_TEMPLATE, ("<turn|>", "<eos>"))}


def modelfile(gguf_name: str, arch: str = "gemma3", adapter: str | None = None) -> str:
    """An Ollama Modelfile for the GGUF file beside it (and a GGUF LoRA adapter beside it: ADAPTER):
    the model's chat template and stop tokens."""
    template, stops = OLLAMA[arch]
    return (f"# Ollama: ollama create NAME -f Modelfile && ollama run NAME\n"
            f"FROM ./{gguf_name}\n"
            + (f"ADAPTER ./{adapter}\n" if adapter else "")
            + f'TEMPLATE """{template}"""\n'
            + "".join(f'PARAMETER stop "{s}"\n' for s in stops))
