"""Image and audio fine-tuning of Gemma 4 through mlx-vlm.

A run is multimodal when its dataset has image or audio parts ({"type": "image", "image": "path"},
{"type": "audio", "audio": "clip.wav"} inside a message's content; paths relative to the dataset
file). mlx-vlm loads the model with its towers, from the Hugging Face checkpoint behind the base or
from a `convert --multimodal` output; the audio tower only when the data has audio (E2B / E4B).
LoRA wraps the same language-model modules as a text run (the towers stay frozen; with
lora.vision_projector the vision projector is adapted too), so the adapter file has the same keys as
a text adapter: chat, fuse and every export work on it unchanged, and `export --format hf` restores
the towers byte for byte from the source (merging a projector adapter). Only assistant text is
learned: the image and audio tokens sit in user turns, outside the loss mask.

Gemma 3n is refused: mlx-vlm does not train it, and its MobileNet vision tower cannot be checked
against transformers here (transformers builds it with timm).
"""

from __future__ import annotations

import re
from pathlib import Path

from mlx_gemma_tune import data
from mlx_gemma_tune.errors import InputError, UserError

VISION_PREFIXES = ("vision_tower.", "embed_vision.", "model.vision_tower.", "model.embed_vision.")
PROJECTOR = "embed_vision.embedding_projection"  # the vision projector's linear map (MLX path)
PROJECTOR_HF = "model.embed_vision.embedding_projection.weight"


def projector_delta(adapter_dir: Path):
    """The change LoRA makes to the vision projector's weight (out, in), or None when it has none."""
    import mlx.core as mx

    from mlx_gemma_tune import hf_checkpoint, lora

    weights = hf_checkpoint.load_safetensors(Path(adapter_dir) / lora.ADAPTER_WEIGHTS)
    if f"{PROJECTOR}.lora_a" not in weights:
        return None
    settings = lora.settings_of(adapter_dir)
    a, b = weights[f"{PROJECTOR}.lora_a"], weights[f"{PROJECTOR}.lora_b"]  # y = x W^T + s (x a) b
    return (settings.scale * (a @ b)).T.astype(mx.float32)


def check_model(config: dict, where: str, audio: bool = False) -> None:
    """A clear refusal unless the checkpoint is a Gemma 4 with a vision (and, for audio, an audio) tower."""
    model_type = config.get("model_type")
    if model_type in ("gemma3n", "gemma3n_text"):
        raise UserError("image and audio fine-tuning of Gemma 3n is not supported: mlx-vlm does not train Gemma 3n, "
                        "and its MobileNet vision tower cannot be verified against transformers", where=where,
                        hint="fine-tune Gemma 4 (E2B / E4B) on images, or Gemma 3n on text only")
    if model_type != "gemma4" or not config.get("vision_config"):
        raise UserError("this model has no vision tower: images and audio need a multimodal Gemma 4", where=where,
                        hint="use a multimodal Gemma 4 checkpoint (e.g. google/gemma-4-E2B-it) or its "
                             "`convert --multimodal` output; text-only models learn from text rows")
    if audio and not config.get("audio_config"):
        raise UserError("this model has no audio tower", where=where,
                        hint="Gemma 4 E2B and E4B hear audio; the larger Gemma 4 models see images only")


def has_vision_weights(model_dir: Path) -> bool:
    from mlx_gemma_tune import hf_checkpoint

    for f in hf_checkpoint.weight_files(model_dir):
        if any(name.startswith(VISION_PREFIXES) for name in hf_checkpoint.inspect_weights(f, hash_it=False).tensors):
            return True
    return False


def vision_source(base: Path) -> Path:
    """The directory mlx-vlm loads with the towers: the base itself if it has them (a `convert
    --multimodal` output, a Hugging Face checkpoint), else the checkpoint it was converted from."""
    from mlx_gemma_tune import hf_checkpoint

    return base if has_vision_weights(base) else hf_checkpoint.source_of(base)


def load(model_dir: Path, audio: bool = False):
    """(mlx-vlm model, processor) of a multimodal Gemma 4 directory, never running remote code.

    Without audio the audio tower is let go (E2B's is ~300M parameters that an image run never
    uses). mlx-vlm's AudioRelativePositionEmbedding comes without the bookkeeping Module.freeze
    needs; it is given an empty one, so that the frozen audio tower stays frozen."""
    from mlx_vlm.utils import load as vlm_load

    model, processor = vlm_load(str(model_dir), trust_remote_code=False)
    if getattr(model, "audio_tower", None) is not None and not audio:
        model.audio_tower = None
        model.embed_audio = None
    for _, module in model.named_modules():
        if not hasattr(module, "_no_grad"):
            object.__setattr__(module, "_no_grad", set())
    return model, processor


def media_file(p: str, where: str, what: str) -> Path:
    """The local file a row's image / audio part names (relative to its dataset file: "path:line",
    "path[i]"), or a clear error."""
    path = Path(p).expanduser()
    path = path if path.is_absolute() else Path(re.sub(r"(:\d+|\[\d+\])$", "", where)).parent / path
    if not path.is_file():
        raise InputError(f"{what} not found: {path}", where=where, hint=f"{what} paths are relative to the dataset file")
    return path


def open_images(paths: list[str], where: str) -> list:
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in (media_file(p, where, "image") for p in paths):
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"cannot read the image {path} ({exc})", where=where) from None
    return images


def open_audio(paths: list[str], where: str, sampling_rate: int) -> list:
    """Waveforms (mono float32 at the feature extractor's rate) of local audio files."""
    from mlx_vlm.utils import load_audio

    clips = []
    for path in (media_file(p, where, "audio file") for p in paths):
        try:
            clips.append(load_audio(str(path), sampling_rate))
        except Exception as exc:  # noqa: BLE001 (the decoder's own errors: one line naming the file)
            raise InputError(f"cannot read the audio file {path} ({exc})", where=where) from None
    return clips


def hf_messages(messages: list[dict]) -> list[dict]:
    """Messages in the chat template's multimodal form: content parts, a placeholder per image / clip."""
    out = []
    for m in messages:
        if "parts" in m:
            parts = [{"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": p["type"]}
                     for p in m["parts"]]
            out.append({"role": m["role"], "content": parts}
                       | ({"reasoning_content": m["reasoning_content"]} if "reasoning_content" in m else {}))
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content", "reasoning_content", "tool_calls",
                                                           "tool_call_id", "name")})
    return out


def encode_row(processor, row, mask_prompt: bool = True, reasoning: str = "train") -> list[data.Example]:
    """The row's training sequences (one, or one per assistant turn as data.encode_conversation
    splits them), each with its image / audio placeholders expanded as the processor expands them,
    the loss mask of the assistant turns, and the pixel values / audio features of the images and
    clips it holds; checked token for token against the processor."""
    from mlx_gemma_tune.dataset_files import media_of

    messages = hf_messages(row.messages)
    tok = processor.tokenizer
    images = open_images(media_of(row.messages, "image"), row.where)
    clips = media_of(row.messages, "audio")
    clips = open_audio(clips, row.where, processor.feature_extractor.sampling_rate) if clips else []
    spans = {}  # placeholder id -> (begin id, end id): <boi> <image> x n <eoi>, <boa> <audio> x n <eoa>
    for soft, begin, end in ((processor.image_token, processor.boi_token, processor.eoi_token),
                             (processor.audio_token, processor.boa_token, processor.eoa_token)):
        if soft:
            spans[tok.convert_tokens_to_ids(soft)] = tuple(tok.convert_tokens_to_ids(x) for x in (begin, end))
    image_id = tok.convert_tokens_to_ids(processor.image_token) if processor.image_token else None
    audio_id = tok.convert_tokens_to_ids(processor.audio_token) if getattr(processor, "audio_token", None) else None
    out = []
    for ex in data.encode_conversation(tok, messages, row.where, reasoning, tools=row.tools):
        # a sequence holds the first n images / clips of the row (a later turn's prompt holds them all)
        n_images, n_clips = ex.tokens.count(image_id), ex.tokens.count(audio_id)
        out.append(_expand(processor, ex, spans, images[:n_images], clips[:n_clips], mask_prompt, row.where))
    return out


def _expand(processor, ex: data.Example, spans: dict, images: list, clips: list, mask_prompt: bool,
            where: str) -> data.Example:
    """ex with each placeholder expanded to the processor's tokens, and the model inputs of its media."""
    import numpy as np

    feats = processor(text=[ex.text], images=images or None, audio=clips or None)
    ids = [int(t) for t in np.asarray(feats["input_ids"]).reshape(-1)]
    mask, j = [], 0
    for t, m in zip(ex.tokens, ex.mask):
        if t in spans:  # one placeholder -> begin, soft tokens, end; never a target
            begin, end = spans[t]
            start = j
            j += ids[j] == begin if j < len(ids) else 0
            while j < len(ids) and ids[j] == t:
                j += 1
            j += ids[j] == end if j < len(ids) else 0
            if j - start < 3:
                _mismatch(where)
            mask += [False] * (j - start)
            continue
        if j >= len(ids) or ids[j] != t:
            _mismatch(where)
        mask.append(bool(m) if mask_prompt else True)
        j += 1
    if j != len(ids):
        _mismatch(where)
    extra = {}
    if images:
        extra["pixel_values"] = np.asarray(feats["pixel_values"])
    if clips:
        extra["input_features"] = np.asarray(feats["input_features"])
        extra["input_features_mask"] = np.asarray(feats["input_features_mask"])
    if "mm_token_type_ids" in feats:
        extra["mm_token_type_ids"] = np.asarray(feats["mm_token_type_ids"]).reshape(1, -1)
    return data.Example(tokens=ids, mask=mask, source=where, extra=extra or None, text=ex.text)


def _mismatch(where: str) -> None:
    raise UserError("internal: the processor's tokens differ from the chat template's; please report this",
                    where=where)


def head(model, extra: dict):
    """(hidden_fn(inputs, cache=None), linear, cap) of an mlx-vlm Gemma 4 for one image / audio row,
    as losses.split_head gives for text models, so that its loss never holds the full logits.

    The hidden states are what mlx-vlm's Model.__call__ feeds its LM head: the token and tower
    embeddings (get_input_embeddings) through the text model; the head is logits_from_hidden's
    tied embedding and soft-cap (tests/test_multimodal.py checks the chunked loss against the full one)."""
    lm = model.language_model
    types = {k: extra[k] for k in ("mm_token_type_ids",) if k in extra}

    def hidden_fn(inputs, cache=None):
        feats = model.get_input_embeddings(input_ids=inputs, **extra)
        return lm.model(None, inputs_embeds=feats.inputs_embeds, per_layer_inputs=feats.per_layer_inputs,
                        cache=cache, **types)

    return hidden_fn, lm.model.embed_tokens.as_linear, lm.final_logit_softcapping


def batch(example: data.Example):
    """(inputs, targets, mask, None, extra) mlx arrays for one multimodal example."""
    import mlx.core as mx

    from mlx_gemma_tune import packing

    inputs, targets, mask, _ = packing.batch_arrays([[example]])
    extra = {k: mx.array(v) for k, v in (example.extra or {}).items()}
    if "mm_token_type_ids" in extra:
        extra["mm_token_type_ids"] = extra["mm_token_type_ids"][:, : inputs.shape[1]]
    return inputs, targets, mask, None, extra
