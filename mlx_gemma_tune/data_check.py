"""`data check`: rows, formats, lengths, overlong, duplicate and empty rows of a dataset (all its splits)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_gemma_tune.data import default_reasoning, encode_row, encode_text, has_reasoning
from mlx_gemma_tune.dataset_files import Row, read_splits
from mlx_gemma_tune.errors import InputError
from mlx_gemma_tune.tools import has_tool_use


@dataclass
class DataReport:
    path: str
    splits: dict[str, int]  # rows per split
    formats: dict[str, int]  # rows per detected format, most common first
    length_unit: str  # "tokens" (rendered exactly as training renders) or "characters" (no tokenizer)
    lengths: dict[str, float]  # min, mean, p50, p95, max
    max_seq_length: int
    too_long: int | None  # rows with more than max_seq_length tokens; None without a tokenizer
    too_long_at: list[str]  # first 3
    duplicates: int  # rows whose normalised content repeats an earlier row, across all splits
    duplicates_at: list[str]  # first 3, as "where (same as where)"
    empty: int  # rows with an empty (or blank) text, message or field
    empty_at: list[str]  # first 3
    refused: list[str]  # every row the model's chat template refuses, as "where: why" (with a tokenizer)
    special_tokens_adjusted: int  # text rows already holding <bos> / a final end-of-turn: not doubled
    special_tokens_adjusted_at: list[str]  # first 3, as "where (what)"
    reasoning: int  # chat rows whose assistant turns carry a thought (trained with thinking on by default)
    tool_use: int  # chat rows that declare tools, call one or carry a tool result

    def to_dict(self) -> dict:
        return asdict(self)


def check_dataset(path: str | Path, tokenizer=None, max_seq_length: int | None = None) -> DataReport:
    """Counts, formats, lengths, overlong, duplicate and empty rows of a dataset (all its splits)."""
    from mlx_gemma_tune.recipe import default

    max_seq_length = max_seq_length or default("data.max_seq_length")
    splits = read_splits(path)
    formats: Counter = Counter()
    lengths: list[int] = []
    too_long, duplicates, empty, refused, adjusted, reasoning, tool_use = [], [], [], [], [], [], []
    first_seen: dict[str, str] = {}
    policy = default_reasoning(tokenizer) if tokenizer is not None else "drop"
    for rows in splits.values():
        for row in rows:
            formats[row.fmt] += 1
            if row.messages is not None and has_reasoning(row.messages):
                reasoning.append(row.where)
            if row.messages is not None and has_tool_use(row.messages, row.tools):
                tool_use.append(row.where)
            try:
                n, what = _length(row, tokenizer, policy)
            except InputError as exc:  # the template refuses the row: list it, go on with the others
                refused.append(f"{row.where}: {exc.message}")
                n, what = None, []  # not in the length statistics: training cannot encode it
            if n is not None:
                lengths.append(n)
            if tokenizer is not None and n is not None and n > max_seq_length:
                too_long.append(row.where)
            if what:
                adjusted.append(f"{row.where} ({', '.join(what)})")
            key = json.dumps(row.messages if row.text is None else row.text, ensure_ascii=False)
            if key in first_seen:
                duplicates.append(f"{row.where} (same as {first_seen[key]})")
            else:
                first_seen[key] = row.where
            # a message made of an image or a clip alone is not empty, nor a tool call without text
            contents = [row.text] if row.text is not None else [
                m["content"] for m in row.messages + ([row.rejected] if row.rejected else [])
                if all(p["type"] == "text" for p in m.get("parts", [])) and not m.get("tool_calls")]
            if any(not c.strip() for c in contents):
                empty.append(row.where)
    ordered = sorted(lengths) or [0]  # every row refused: no lengths to show
    stats = {"min": ordered[0], "mean": round(sum(ordered) / len(ordered), 1),
             "p50": _percentile(ordered, 0.50), "p95": _percentile(ordered, 0.95), "max": ordered[-1]}
    return DataReport(
        path=str(path), splits={s: len(r) for s, r in splits.items()}, formats=dict(formats.most_common()),
        length_unit="tokens" if tokenizer is not None else "characters", lengths=stats,
        max_seq_length=max_seq_length, too_long=len(too_long) if tokenizer is not None else None,
        too_long_at=too_long[:3], duplicates=len(duplicates), duplicates_at=duplicates[:3],
        empty=len(empty), empty_at=empty[:3], refused=refused, special_tokens_adjusted=len(adjusted),
        special_tokens_adjusted_at=adjusted[:3], reasoning=len(reasoning), tool_use=len(tool_use))


def _length(row: Row, tokenizer, reasoning: str = "drop") -> tuple[int, list[str]]:
    """(length, special tokens a text row already holds): characters without a tokenizer; else the
    tokens training sees (chat template, bos/eos) in the row's longest sequence (a conversation on a
    Gemma 4 26B/31B template is one sequence per turn)."""
    if tokenizer is None:
        return (len(row.text) if row.text is not None else sum(len(m["content"]) for m in row.messages)), []
    if row.text is not None:
        ex, adjusted = encode_text(tokenizer, row.text, row.where)
        return len(ex.tokens), adjusted
    if row.rejected is not None:  # a preference pair: both answers after the shared prompt, the longer counts
        pair = encode_row(tokenizer, row, reasoning=reasoning, pairs=True)[0]
        return max(len(pair.tokens), len(pair.rejected.tokens)), []
    return max(len(ex.tokens) for ex in encode_row(tokenizer, row, reasoning=reasoning)), []


def _percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def check(path: str | Path, model: str | Path | None = None, max_seq_length: int | None = None) -> DataReport:
    """check_dataset with the tokenizer of a local model directory (token lengths), if given."""
    tokenizer = None
    if model is not None:
        from mlx_lm.utils import load_tokenizer

        from mlx_gemma_tune.demo import resolve_alias
        from mlx_gemma_tune.models import resolve_model_dir

        tokenizer = load_tokenizer(resolve_model_dir(resolve_alias(model)))
    return check_dataset(path, tokenizer, max_seq_length)
