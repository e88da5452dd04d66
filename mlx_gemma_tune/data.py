"""Datasets: read and validate rows, render them with the model's own chat template, and
mark the tokens the loss is computed on (every assistant turn, not only the last).

Masks follow the template actually used: each assistant turn's span is what the
template adds between "history + generation prompt" and "history + this answer", so
Gemma 3 (`<start_of_turn>model`) and Gemma 4 (`<|turn>model`) need no hard-coded markers.
The end-of-turn marker belongs to the answer, so the model learns to stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlx_gemma_tune.errors import InputError

ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                "model": "assistant", "gpt": "assistant", "bot": "assistant"}


@dataclass
class Example:
    tokens: list[int]
    mask: list[bool]  # True where the token is a training target (predicted from the one before)
    source: str  # "file:line", for messages


def read_chat_jsonl(path: Path) -> list[tuple[str, list[dict]]]:
    """[(where, messages)] from a JSONL file of {"messages": [...]} or {"prompt", "completion"} rows."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", where=str(path))
    rows = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"is not UTF-8 text (byte {exc.start})", where=str(path),
                         hint="re-save it as UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"is not valid JSON ({exc.msg}, column {exc.colno})", where=where) from None
        rows.append((where, _messages(row, where)))
    if not rows:
        raise InputError("has no rows", where=str(path))
    return rows


def _messages(row, where: str) -> list[dict]:
    if not isinstance(row, dict):
        raise InputError("must be a JSON object", where=where)
    if "messages" in row:
        msgs = row["messages"]
    elif "prompt" in row and "completion" in row:
        msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    else:
        raise InputError("needs a 'messages' list (or 'prompt' and 'completion')", where=where,
                         hint=f"found keys: {', '.join(sorted(row)) or 'none'}")
    if not isinstance(msgs, list) or not msgs:
        raise InputError("'messages' must be a non-empty list", where=where)
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"message {i} needs 'role' and 'content'", where=where)
        role = ROLE_ALIASES.get(str(m["role"]).lower())
        if role is None:
            raise InputError(f"message {i} has unknown role '{m['role']}'", where=where,
                             hint="use system, user or assistant")
        if not isinstance(m["content"], str):
            raise InputError(f"message {i} content must be a string", where=where)
        out.append({"role": role, "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise InputError("has no assistant message to learn from", where=where)
    return out


def _render(hf_tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_chat(tokenizer, messages: list[dict], where: str = "") -> Example:
    """Tokens of the rendered conversation and the mask of every assistant turn's tokens."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper or a transformers tokenizer
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


def load_chat_examples(tokenizer, path: Path, max_seq_length: int | None = None) -> tuple[list[Example], int]:
    """Encoded examples of a chat JSONL file, and how many were truncated to max_seq_length."""
    examples, truncated = [], 0
    for where, messages in read_chat_jsonl(path):
        ex = encode_chat(tokenizer, messages, where)
        if max_seq_length and len(ex.tokens) > max_seq_length:
            ex = Example(ex.tokens[:max_seq_length], ex.mask[:max_seq_length], ex.source)
            truncated += 1
        examples.append(ex)
    return examples, truncated


def batches(examples: list[Example], batch_size: int, pad_id: int = 0):
    """Yield (inputs, targets, mask) mlx arrays, right-padded to the longest row of each batch."""
    import mlx.core as mx
    import numpy as np

    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(e.tokens) for e in chunk)
        toks = np.full((len(chunk), width), pad_id, dtype=np.int32)
        mask = np.zeros((len(chunk), width), dtype=np.float32)
        for r, e in enumerate(chunk):
            toks[r, : len(e.tokens)] = e.tokens
            mask[r, : len(e.mask)] = e.mask
        yield mx.array(toks[:, :-1]), mx.array(toks[:, 1:]), mx.array(mask[:, 1:])
