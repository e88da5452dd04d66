"""Evaluation: held-out loss / perplexity over the assistant tokens of a dataset."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from mlx_gemma_tune import data, losses


@dataclass
class LossResult:
    loss: float
    perplexity: float
    tokens: int
    rows: int
    truncated: int

    def to_dict(self) -> dict:
        return asdict(self)


def dataset_loss(model, examples: list[data.Example], batch_size: int = 4,
                 on_batch: Callable[[int, int], None] | None = None) -> tuple[float, int]:
    """Mean token cross-entropy (training forward: no cache) and the number of target tokens."""
    import mlx.core as mx

    total, count, done = 0.0, 0, 0
    for inputs, targets, mask in data.batches(examples, batch_size):
        s, n = losses.masked_cross_entropy(model, inputs, targets, mask)
        mx.eval(s, n)
        total += float(s)
        count += int(n)
        done += inputs.shape[0]
        if on_batch:
            on_batch(done, len(examples))
    return (total / count if count else float("nan")), count


def evaluate_loss(model_path: Path, data_path: Path, *, adapter: Path | None = None, batch_size: int = 4,
                  max_seq_length: int | None = 2048,
                  progress: Callable[[int, int], None] | None = None) -> LossResult:
    from mlx_gemma_tune import lora, models

    model_path = models.resolve_model_dir(model_path)
    model, tokenizer, config = models.load(model_path)
    if adapter is not None:
        lora.load(model, config, adapter)
    examples, truncated = data.load_examples(tokenizer, data_path, max_seq_length)
    loss, tokens = dataset_loss(model, examples, batch_size, progress)
    return LossResult(loss=loss, perplexity=math.exp(loss) if loss == loss else float("nan"),
                      tokens=tokens, rows=len(examples), truncated=truncated)
