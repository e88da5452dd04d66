"""Text to measure what an export or a quantization costs, and MLX's score on it.

`chunks()` gives token chunks from a built-in English sample (calibration/sample.txt: prose,
a recipe, code explanation, a letter, dialogue, notes; written for this project) or from the
user's own data (`--calibration FILE`: any dataset file `train` reads, rows rendered with the
model's chat template). `mlx_scores()` scores them with an MLX model the way
gguf_llama_cpp.score() does with llama.cpp, so the two perplexities compare like for like.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE = Path(__file__).parent / "calibration" / "sample.txt"
CHUNK_TOKENS = 256
MAX_CHUNKS = 8


def chunks(tokenizer, path: str | Path | None = None, chunk_tokens: int = CHUNK_TOKENS,
           max_chunks: int = MAX_CHUNKS) -> tuple[list[list[int]], str]:
    """(token id chunks of at most chunk_tokens ids, at most max_chunks of them, each with >= 2 ids;
    a description of the text for the summary).

    path None: the built-in sample, one `<bos> paragraph` per chunk. A dataset file: one chunk per
    row (the whole conversation through the chat template, cut to chunk_tokens). Raises InputError
    for an unreadable file (dataset_files.read_rows)."""
    from mlx_gemma_tune import data, dataset_files

    if path is None:
        paragraphs = [p.strip() for p in SAMPLE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        examples = [data.encode_text(tokenizer, p)[0] for p in paragraphs]
        where = f"the built-in English sample ({len(paragraphs)} paragraphs)"
    else:
        rows = dataset_files.read_rows(path)[:max_chunks]
        examples = [data.encode_row(tokenizer, row, mask_prompt=False)[-1] for row in rows]
        where = f"{len(rows)} rows of {path}"
    out = [ex.tokens[:chunk_tokens] for ex in examples if len(ex.tokens) >= 2][:max_chunks]
    return out, where


def mlx_scores(model, token_chunks: list[list[int]]):
    """gguf_llama_cpp.Scores of an MLX model (logits in float32) over the chunks."""
    import mlx.core as mx
    import numpy as np

    from mlx_gemma_tune.gguf_llama_cpp import scores_from_logits

    logits = []
    for ids in token_chunks:
        out = model(mx.array([ids]))[0].astype(mx.float32)
        mx.eval(out)
        logits.append(out)
    return scores_from_logits([np.array(x) for x in logits], token_chunks)
