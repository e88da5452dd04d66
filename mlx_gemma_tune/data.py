"""Datasets: read and validate rows, render them with the model's own chat template, and
mark the tokens the loss is computed on (every assistant turn, not only the last).

Masks follow the template actually used: each assistant turn's span is what the
template adds between "history + generation prompt" and "history + this answer", so
Gemma 3 (`<start_of_turn>model`) and Gemma 4 (`<|turn>model`) need no hard-coded markers.
The end-of-turn marker belongs to the answer, so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_gemma_tune.errors import InputError

ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                "model": "assistant", "gpt": "assistant", "bot": "assistant"}


@dataclass
class Example:
    tokens: list[int]
    mask: list[bool]  # True where the token is a training target (predicted from the one before)
    source: str  # "file:line", for messages
    extra: dict | None = None  # image / audio rows: numpy model inputs, e.g. pixel_values (see multimodal.py)


def hf_tokenizer(tokenizer):
    """The transformers tokenizer inside mlx-lm's TokenizerWrapper, or the tokenizer itself."""
    inner = getattr(tokenizer, "_tokenizer", None)
    return inner if inner is not None and hasattr(inner, "apply_chat_template") else tokenizer


def _render(hf_tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_chat(tokenizer, messages: list[dict], where: str = "") -> Example:
    """Tokens of the rendered conversation and the mask of every assistant turn's tokens."""
    hf = hf_tokenizer(tokenizer)
    full = _render(hf, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(hf, messages[:i], True)
        upto = _render(hf, messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise InputError(f"the chat template renders turn {i} differently in context, so its loss mask "
                             "cannot be found", where=where)
        spans.append((len(before), len(upto)))
    enc = hf(full, add_special_tokens=False, return_offsets_mapping=True)
    tokens = list(enc["input_ids"])
    in_answer = [any(s <= start and end <= e for s, e in spans) and end > start
                 for start, end in enc["offset_mapping"]]
    # Token t is a target when it lies in an answer; the model predicts it from t-1.
    return Example(tokens=tokens, mask=in_answer, source=where)


def load_examples(tokenizer, path, max_seq_length: int | None = None, mask_prompt: bool = True):
    """Encoded examples of every row of a dataset (any format), and how many were truncated."""
    from mlx_gemma_tune import dataset_files

    examples, truncated = [], 0
    for row in dataset_files.read_rows(path):
        ex = encode_row(tokenizer, row, mask_prompt)
        if max_seq_length:
            fitted = fit_length(ex, max_seq_length, "truncate")
            truncated += fitted is not ex
            ex = fitted
        examples.append(ex)
    return examples, truncated


def batches(examples: list[Example], batch_size: int, pad_id: int = 0):
    """Yield (inputs, targets, mask) mlx arrays, right-padded to the longest row of each batch."""
    from mlx_gemma_tune import packing

    for start in range(0, len(examples), batch_size):
        yield packing.batch_arrays([[e] for e in examples[start:start + batch_size]], pad_id)[:3]


def encode_row(tokenizer, row, mask_prompt: bool = True) -> Example:
    """Tokens and loss mask of a normalised dataset row (see dataset_files.Row)."""
    if row.messages is not None:
        ex = encode_chat(tokenizer, row.messages, row.where)
        if not mask_prompt:
            ex.mask = [True] * len(ex.tokens)
        return ex
    hf = hf_tokenizer(tokenizer)
    ids = hf(row.text, add_special_tokens=False)["input_ids"]
    tokens = [hf.bos_token_id] + list(ids) + [hf.eos_token_id]
    return Example(tokens=tokens, mask=[True] * len(tokens), source=row.where)


def _cut_extra(ex: Example, max_len: int) -> dict | None:
    """An image / audio row's extras for its first max_len tokens; an image or a clip is never cut."""
    if not ex.extra:
        return ex.extra
    kinds = ex.extra.get("mm_token_type_ids")
    if kinds is not None and kinds[0, max_len:].any():
        raise InputError(f"is {len(ex.tokens)} tokens and truncating it to data.max_seq_length {max_len} would cut "
                         "an image or audio clip", where=ex.source,
                         hint="raise data.max_seq_length, or use fewer or smaller images / shorter clips")
    return {**ex.extra, **({"mm_token_type_ids": kinds[:, :max_len]} if kinds is not None else {})}


def fit_length(ex: Example, max_len: int, policy: str) -> Example | None:
    """Apply data.overlong to one example: the example, a truncated copy, or None (dropped)."""
    if len(ex.tokens) <= max_len:
        return ex
    if policy == "truncate":
        return Example(ex.tokens[:max_len], ex.mask[:max_len], ex.source, _cut_extra(ex, max_len))
    if policy == "drop":
        return None
    raise InputError(f"is {len(ex.tokens)} tokens, longer than data.max_seq_length {max_len}", where=ex.source,
                     hint="raise data.max_seq_length, or set data.overlong to truncate or drop")
