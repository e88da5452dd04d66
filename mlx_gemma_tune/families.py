"""The Gemma families this tool knows, detected from config.json.

One place for what differs between families: which model_type values belong to
them, which parts of a Hugging Face checkpoint mlx-lm drops on conversion (and
export must later restore), and which chat format they speak.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_gemma_tune.errors import UnsupportedModelError

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
            return Detected(family, model_type, _variant(family, config), "text_config" in config)
    raise UnsupportedModelError(
        f"model_type '{model_type}' is not a Gemma model this tool supports",
        where=where,
        hint="supported model_type values: " + ", ".join(SUPPORTED_MODEL_TYPES),
    )


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
