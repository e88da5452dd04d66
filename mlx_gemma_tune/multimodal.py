"""Image fine-tuning of Gemma 4 through mlx-vlm.

A run is multimodal when its dataset has image parts ({"type": "image", "image": "path"} inside
a message's content; paths relative to the dataset file). mlx-vlm loads the model with its vision
tower, from the Hugging Face checkpoint behind the base or from a `convert --multimodal` output.
LoRA wraps the same language-model modules as a text run (the vision tower and its projector stay
frozen), so the adapter file has the same keys as a text adapter: chat, fuse and every export
work on it unchanged, and `export --format hf` restores the towers byte for byte from the source.
Only assistant text is learned: the image tokens sit in user turns, outside the loss mask.

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

    from mlx_gemma_tune import checkpoint, lora

    weights = checkpoint.load_safetensors(Path(adapter_dir) / lora.ADAPTER_WEIGHTS)
    if f"{PROJECTOR}.lora_a" not in weights:
        return None
    settings = lora.settings_of(adapter_dir)
    a, b = weights[f"{PROJECTOR}.lora_a"], weights[f"{PROJECTOR}.lora_b"]  # y = x W^T + s (x a) b
    return (settings.scale * (a @ b)).T.astype(mx.float32)


def check_model(config: dict, where: str) -> None:
    """A clear refusal unless the checkpoint is a Gemma 4 with a vision tower."""
    model_type = config.get("model_type")
    if model_type in ("gemma3n", "gemma3n_text"):
        raise UserError("image fine-tuning of Gemma 3n is not supported: mlx-vlm does not train Gemma 3n, and its "
                        "MobileNet vision tower cannot be verified against transformers", where=where,
                        hint="fine-tune Gemma 4 (E2B / E4B) on images, or Gemma 3n on text only")
    if model_type != "gemma4" or not config.get("vision_config"):
        raise UserError("the dataset has images but this model has no vision tower", where=where,
                        hint="use a multimodal Gemma 4 checkpoint (e.g. google/gemma-4-E2B-it) or its "
                             "`convert --multimodal` output; text-only models learn from text rows")


def has_vision_weights(model_dir: Path) -> bool:
    from mlx_gemma_tune import checkpoint

    for f in checkpoint.weight_files(model_dir):
        if any(name.startswith(VISION_PREFIXES) for name in checkpoint.inspect_weights(f, hash_it=False).tensors):
            return True
    return False


def vision_source(base: Path) -> Path:
    """The directory mlx-vlm loads with the towers: the base itself if it has them (a `convert
    --multimodal` output, a Hugging Face checkpoint), else the checkpoint it was converted from."""
    from mlx_gemma_tune import export

    return base if has_vision_weights(base) else export._source_of(base, None)


def load(model_dir: Path):
    """(mlx-vlm model, processor) of a multimodal Gemma 4 directory, never running remote code.

    The audio tower is let go: image runs never use it (E2B's is ~300M parameters), and mlx-vlm's
    Gemma 4 audio modules cannot be frozen (AudioRelativePositionEmbedding breaks Module.freeze)."""
    from mlx_vlm.utils import load as vlm_load

    model, processor = vlm_load(str(model_dir), trust_remote_code=False)
    if getattr(model, "audio_tower", None) is not None:
        model.audio_tower = None
        model.embed_audio = None
    return model, processor


def image_dir(where: str) -> Path:
    """The folder image paths of a row are relative to: its dataset file's ("path:line", "path[i]")."""
    return Path(re.sub(r"(:\d+|\[\d+\])$", "", where)).parent


def open_images(paths: list[str], where: str) -> list:
    from PIL import Image, UnidentifiedImageError

    images = []
    for p in paths:
        path = Path(p).expanduser()
        path = path if path.is_absolute() else image_dir(where) / path
        if not path.is_file():
            raise InputError(f"image not found: {path}", where=where, hint="image paths are relative to the dataset file")
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"cannot read the image {path} ({exc})", where=where) from None
    return images


def hf_messages(messages: list[dict]) -> list[dict]:
    """Messages in the chat template's multimodal form: content parts, an image part per image."""
    out = []
    for m in messages:
        if "parts" in m:
            parts = [{"type": "image"} if p["type"] == "image" else {"type": "text", "text": p["text"]}
                     for p in m["parts"]]
            out.append({"role": m["role"], "content": parts})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def encode_row(processor, row, mask_prompt: bool = True) -> data.Example:
    """Tokens (image placeholders expanded as the processor expands them), the loss mask of the
    assistant turns, and the pixel values; checked token for token against the processor."""
    import numpy as np

    from mlx_gemma_tune.dataset_files import images_of

    messages = hf_messages(row.messages)
    tok = processor.tokenizer
    ex = data.encode_chat(tok, messages, row.where)
    images = open_images(images_of(row), row.where)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    feats = processor(text=[text], images=images or None)
    ids = [int(t) for t in np.asarray(feats["input_ids"]).reshape(-1)]
    image_id, boi, eoi = (tok.convert_tokens_to_ids(t) for t in
                          (processor.image_token, processor.boi_token, processor.eoi_token))
    mask, j = [], 0
    for t, m in zip(ex.tokens, ex.mask):
        if t == image_id:  # one placeholder -> <boi> <image> x n <eoi>, never a target
            start = j
            j += ids[j] == boi if j < len(ids) else 0
            while j < len(ids) and ids[j] == image_id:
                j += 1
            j += ids[j] == eoi if j < len(ids) else 0
            if j - start < 3:
                _mismatch(row.where)
            mask += [False] * (j - start)
            continue
        if j >= len(ids) or ids[j] != t:
            _mismatch(row.where)
        mask.append(bool(m) if mask_prompt else True)
        j += 1
    if j != len(ids):
        _mismatch(row.where)
    extra = {}
    if images:
        extra["pixel_values"] = np.asarray(feats["pixel_values"])
    if "mm_token_type_ids" in feats:
        extra["mm_token_type_ids"] = np.asarray(feats["mm_token_type_ids"]).reshape(1, -1)
    return data.Example(tokens=ids, mask=mask, source=row.where, extra=extra or None)


def _mismatch(where: str) -> None:
    raise UserError("internal: the processor's tokens differ from the chat template's; please report this",
                    where=where)


def batch(example: data.Example):
    """(inputs, targets, mask, None, extra) mlx arrays for one multimodal example."""
    import mlx.core as mx

    from mlx_gemma_tune import packing

    inputs, targets, mask, _ = packing.batch_arrays([[example]])
    extra = {k: mx.array(v) for k, v in (example.extra or {}).items()}
    if "mm_token_type_ids" in extra:
        extra["mm_token_type_ids"] = extra["mm_token_type_ids"][:, : inputs.shape[1]]
    return inputs, targets, mask, None, extra
