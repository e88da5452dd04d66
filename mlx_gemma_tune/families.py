"""The Gemma families this tool knows, detected from config.json.

One place for what differs between families: which model_type values belong to
them, which parts of a Hugging Face checkpoint mlx-lm drops on conversion (and
export must later restore), and which chat format they speak.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_gemma_tune.errors import UnsupportedModelError, UserError

END_OF_TURN = ("<end_of_turn>", "<turn|>")  # the end-of-turn markers of Gemma 3 / 3n and of Gemma 4

# Components of a multimodal checkpoint that the text model does not use. mlx-lm's
# sanitize() drops them; they are recorded at convert time so export can put them back.
TOWER_COMPONENTS = (
    "vision_tower",
    "audio_tower",
    "embed_vision",
    "embed_audio",
    "multi_modal_projector",
    "vision_embedder",
)


@dataclass(frozen=True)
class Family:
    name: str  # gemma3 | gemma3n | gemma4
    display: str
    model_types: tuple[str, ...]
    chat_format: str  # "gemma3" (<start_of_turn>) or "gemma4" (<|turn>)


FAMILIES = (
    Family("gemma3", "Gemma 3", ("gemma3", "gemma3_text"), "gemma3"),
    Family("gemma3n", "Gemma 3n", ("gemma3n", "gemma3n_text"), "gemma3"),
    Family("gemma4", "Gemma 4", ("gemma4", "gemma4_text"), "gemma4"),
)

SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


@dataclass(frozen=True)
class Detected:
    family: Family
    model_type: str
    variant: str  # human description, e.g. "MoE (26B-A4B-style)"
    multimodal: bool  # the checkpoint is laid out as *ForConditionalGeneration


def text_config(config: dict) -> dict:
    """The text-decoder part of a (possibly multimodal) config."""
    return config.get("text_config") or config


def detect(config: dict, where: str = "config.json") -> Detected:
    """Identify the Gemma family of a Hugging Face config, or refuse clearly."""
    model_type = config.get("model_type")
    if not model_type:
        raise UnsupportedModelError(
            "has no 'model_type' key", where=where, hint="is this a Hugging Face model directory?"
        )
    for family in FAMILIES:
        if model_type in family.model_types:
            _check_config(config, where)
            return Detected(family, model_type, _variant(family, config), "text_config" in config)
    raise UnsupportedModelError(
        f"model_type '{model_type}' is not a Gemma model this tool supports",
        where=where,
        hint="supported model_type values: " + ", ".join(SUPPORTED_MODEL_TYPES),
    )


REQUIRED_TEXT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def _check_config(config: dict, where: str) -> None:
    """The fields every tool downstream reads; without them mlx-lm silently uses another model's defaults."""
    text = text_config(config)
    missing = [k for k in REQUIRED_TEXT_KEYS if text.get(k) in (None, "")]
    if missing:
        section = "text_config." if "text_config" in config else ""
        raise UnsupportedModelError(f"is missing {', '.join(section + k for k in missing)}", where=where,
                                    hint="restore the original config.json of this checkpoint")
    sections = [(config, "")] + ([(text, "text_config.")] if text is not config else [])
    for cfg, prefix in sections:
        for key in ("torch_dtype", "dtype"):
            value = cfg.get(key)
            if value is not None and value != "auto" and value not in FLOAT_DTYPES:
                raise UnsupportedModelError(f"{prefix}{key} is '{value}', not a float type", where=where,
                                            hint=f"Gemma weights are {', '.join(FLOAT_DTYPES)}; restore the "
                                                 "original config.json")


def _variant(family: Family, config: dict) -> str:
    tc = text_config(config)
    if family.name != "gemma4":
        return "text-only" if "text_config" not in config else "multimodal"
    if tc.get("enable_moe_block"):
        return "MoE (26B-A4B-style)"
    if tc.get("num_kv_shared_layers") or tc.get("hidden_size_per_layer_input"):
        return "edge (E2B/E4B-style)"
    return "dense (31B-style)"


def tower_component(key: str) -> str | None:
    """The tower a Hugging Face weight name belongs to, or None for text-model weights."""
    parts = key.split(".")
    if parts[0] == "model" and len(parts) > 1:
        parts = parts[1:]
    return parts[0] if parts[0] in TOWER_COMPONENTS else None


# ---- LoRA target policy ---------------------------------------------------------------------
# Names are relative to a decoder layer, as mlx-lm builds it for every Gemma family.
TARGET_GROUPS = {
    "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
TARGET_GROUPS["all"] = TARGET_GROUPS["attention"] + TARGET_GROUPS["mlp"]
EXPERT_TARGETS = ("experts.switch_glu.gate_proj", "experts.switch_glu.up_proj", "experts.switch_glu.down_proj")
# Never adapted, whatever is asked: AltUp coefficients are re-assigned (clipped) in the
# forward pass, so a LoRA wrapper there breaks it; the others are not what a LoRA should
# change (PLE, LAuReL, routers, embeddings, towers).
FORBIDDEN = ("altup", "laurel", "per_layer", "router", "embed", "vision", "audio")
KV_NAMES = ("self_attn.k_proj", "self_attn.v_proj")


def _expand(targets) -> tuple[str, ...]:
    """Group names ("all", "attention", "mlp") and short names ("q_proj") -> layer-relative names."""
    if isinstance(targets, str):
        targets = [targets]
    known = TARGET_GROUPS["all"] + EXPERT_TARGETS
    out: list[str] = []
    for t in targets:
        if t in TARGET_GROUPS:
            out += TARGET_GROUPS[t]
            continue
        if any(f in t for f in FORBIDDEN):
            raise UserError(f"LoRA target '{t}' is not allowed: AltUp, LAuReL, per-layer-embedding, router, "
                            "embedding and tower modules are never adapted",
                            where="lora.targets", hint="choose from all, attention, mlp or " + ", ".join(known))
        matches = [k for k in known if k == t or k.endswith("." + t)]
        if not matches:
            import difflib

            close = difflib.get_close_matches(t, list(TARGET_GROUPS) + [k.rsplit(".", 1)[-1] for k in known], n=1)
            hint = f"did you mean '{close[0]}'?" if close else "choose from all, attention, mlp or " + ", ".join(known)
            raise UserError(f"unknown LoRA target '{t}'", where="lora.targets", hint=hint)
        out += matches
    return tuple(dict.fromkeys(out))


def lora_targets(model, config: dict, targets="all", num_layers: int | None = None,
                 experts: bool = False, dora: bool = False) -> list[str]:
    """Full module paths to wrap with LoRA/DoRA for this Gemma model.

    Default: attention q/k/v/o and MLP gate/up/down on every decoder layer. K/V are
    skipped where a layer has none of its own (KV-shared layers, K=V global layers have
    no v_proj); MoE experts only with `experts=True` (and never with DoRA, which mlx-lm
    cannot apply to switch layers). `num_layers` keeps only the last N layers.
    """
    names = _expand(targets)
    tc = text_config(config)
    if experts:
        if not tc.get("enable_moe_block"):
            raise UserError("lora.experts is set but this model has no MoE experts", where="lora.experts",
                            hint="set lora.experts: false")
        if dora:
            raise UserError("DoRA cannot adapt MoE expert layers (mlx-lm has no DoRA switch layer)",
                            where="lora.experts", hint="use method lora, or set lora.experts: false")
        names += EXPERT_TARGETS
    layers = list(model.layers)
    n = len(layers)
    if num_layers is not None and not 1 <= num_layers <= n:
        raise UserError(f"lora.num_layers must be between 1 and {n} for this model, not {num_layers}",
                        where="lora.num_layers")
    first_shared = n - int(tc.get("num_kv_shared_layers") or 0)
    layer_ids = {id(layer) for layer in layers}
    prefix = {id(m): p for p, m in model.named_modules() if id(m) in layer_ids}
    paths: list[str] = []
    for i, layer in enumerate(layers):
        if num_layers is not None and i < n - num_layers:
            continue
        present = dict(layer.named_modules())
        for name in names:
            if name not in present or (i >= first_shared and name in KV_NAMES):
                continue
            paths.append(f"{prefix[id(layer)]}.{name}")
    if not paths:
        raise UserError("these LoRA settings select no module of this model", where="lora.targets",
                        hint="widen lora.targets or lora.num_layers")
    return paths
