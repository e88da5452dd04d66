"""The run directory: everything a training run writes, each write atomic.

    RUN/recipe.yaml               the resolved recipe (what `--resume` continues)
    RUN/base.json                 the base model directory it trained on, and where that came from
    RUN/adapters.safetensors      the run's adapter (best validation, else latest) in mlx-lm's format
    RUN/adapter_config.json       so `mlx_lm.generate --model BASE --adapter-path RUN` works
    RUN/checkpoints/step-NNNNNNNN/  adapters, optimizer state, trainer state (complete or absent)
    RUN/metrics.jsonl             one JSON object per report (train and validation)
    RUN/loss.png                  train and validation loss against step
    RUN/summary.json              the outcome
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlx_gemma_tune import fsio, hf_checkpoint
from mlx_gemma_tune.errors import InputError

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
BASE = "base.json"


def write_recipe(run: Path, recipe) -> None:
    """RUN/recipe.yaml: the resolved recipe (recipe.Recipe), what `--resume` continues."""
    from mlx_gemma_tune import recipe as recipes

    header = ("# The resolved recipe of this run: defaults < recipe < flags and --set.\n"
              f"# Continue it with: mlx-gemma-tune train --resume {run}\n")
    fsio.atomic_write_text(Path(run) / "recipe.yaml", recipes.to_yaml(recipe, header))


def record_base(run: Path, base: Path, source: str, quantize: int | None) -> None:
    """Write RUN/base.json: the base model directory the run trains on (model.path converted or
    quantized as the recipe asks), so that opening the run later never converts anything."""
    fsio.atomic_write_json(Path(run) / BASE, {"base": str(Path(base).absolute()), "source": source,
                                              "quantize": quantize})


def data_settings(model_or_run: str, max_seq_length: int | None, tokenizer) -> tuple[int, str]:
    """(max_seq_length, data.reasoning) a dataset is measured with for `model_or_run`: a run's own
    (an explicit max_seq_length wins), else the recipe defaults, with reasoning counted as training
    would on this tokenizer's model (data.default_reasoning)."""
    from mlx_gemma_tune import data, recipe

    p = Path(model_or_run).expanduser()
    if (p / "recipe.yaml").is_file():
        r = recipe.build(recipe.read_yaml(p / "recipe.yaml"), source=str(p / "recipe.yaml"))
        return max_seq_length or r.data.max_seq_length, r.data.reasoning
    return max_seq_length or recipe.default("data.max_seq_length"), data.default_reasoning(tokenizer)


def resolve_target(model_or_run: str) -> tuple[str, Path | None]:
    """(base model directory, adapter directory or None) for a model directory or a training run.

    A run opens on the base it recorded at train time (RUN/base.json; runs older than that file: the
    cache directory its recipe maps to). Nothing is converted or downloaded here: a base that is gone
    raises InputError naming it and the command that recreates it."""
    from mlx_gemma_tune import demo, lora

    p = Path(demo.resolve_alias(model_or_run)).expanduser()  # "demo": the bundled Gemma 3 270M
    if not (p / "recipe.yaml").is_file():
        return str(p), None
    if not (p / lora.ADAPTER_WEIGHTS).is_file():
        raise InputError("is a run directory without an adapter (adapters.safetensors) yet", where=str(p),
                         hint="wait for its first checkpoint, or resume it with `mlx-gemma-tune train --resume`")
    if (p / BASE).is_file():
        recorded = json.loads((p / BASE).read_text(encoding="utf-8"))
        base, source, quantize = Path(recorded["base"]), recorded["source"], recorded.get("quantize")
    else:
        from mlx_gemma_tune import convert, recipe

        r = recipe.build(recipe.read_yaml(p / "recipe.yaml"), source=str(p / "recipe.yaml"))
        source, quantize = r.model.path, r.model.quantize
        base = convert.base_dir_for(source, quantize)
    if not (base / "config.json").is_file():
        if source == "demo":
            hint = "the bundled model rebuilds itself on first use: mlx-gemma-tune generate demo --prompt Hi"
        elif base == Path(source).expanduser():
            hint = f"the run trained on the checkpoint at {source}: put it back there"
        else:
            hint = f"recreate it with: mlx-gemma-tune convert {source} -o {base}" + (
                f" --quantize {quantize}" if quantize else "")
        raise InputError(f"the run's base model is missing: {base}", where=str(p), hint=hint)
    return str(base), p


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete once its state.json exists)."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


def write_checkpoint(run: Path, step: int, model, settings, optimizer, state: dict) -> Path:
    """Adapter + optimizer + trainer state, staged in a hidden directory and renamed into place."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_gemma_tune import lora

    final = checkpoint_dir(run, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    with fsio.staged_dir(final) as tmp:
        lora.save(model, settings, tmp)
        opt = {k: v for k, v in tree_flatten(optimizer.state)}
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt)
        fsio.atomic_write_json(tmp / "state.json", state)
    return final


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(trainer state, optimizer state tree) of a checkpoint."""
    from mlx.utils import tree_unflatten

    state = json.loads((Path(path) / "state.json").read_text())
    opt = tree_unflatten(list(hf_checkpoint.load_safetensors(Path(path) / "optimizer.safetensors").items()))
    return state, opt


def prune_checkpoints(run: Path, keep: int, protect: Path | None = None) -> None:
    done = list_checkpoints(run)
    for p in done[:-keep] if keep else done:
        if protect is None or p.resolve() != Path(protect).resolve():
            fsio.remove_dir(p)


def publish_adapter(run: Path, source: Path) -> None:
    """Copy a checkpoint's adapter to the run's top level (atomically, config last)."""
    from mlx_gemma_tune.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        fsio.atomic_write_bytes(Path(run) / name, (Path(source) / name).read_bytes())


class Metrics:
    """metrics.jsonl, appended one line at a time and flushed; truncated to a checkpoint on resume."""

    def __init__(self, run: Path, keep_lines: int | None = None):
        self.path = Path(run) / METRICS
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        if keep_lines is not None and len(lines) != keep_lines:
            fsio.atomic_write_text(self.path, "".join(line + "\n" for line in lines[:keep_lines]))
            lines = lines[:keep_lines]
        self.count = len(lines)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.count += 1

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.is_file() else []


def plot_losses(run: Path, records: list[dict]) -> Path | None:
    """loss.png: training loss (blue) and validation loss (orange) against step, drawn with Pillow."""
    from PIL import Image, ImageDraw

    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "val"]
    points = train + val
    if not points:
        return None
    w, h, pad = 640, 400, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def to_px(x, y):
        return (pad + (x - x0) / (x1 - x0) * (w - 2 * pad), h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad))

    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        d.text((4, to_px(x0, y)[1] - 6), f"{y:.3g}", fill="black")
    d.text((pad, h - pad + 8), f"step {x0}", fill="black")
    d.text((w - pad - 60, h - pad + 8), f"step {x1}", fill="black")
    d.text((pad + 8, pad - 20), "train loss", fill=(31, 119, 180))
    d.text((pad + 100, pad - 20), "validation loss", fill=(255, 127, 14))
    for series, colour in ((train, (31, 119, 180)), (val, (255, 127, 14))):
        if len(series) > 1:
            d.line([to_px(x, y) for x, y in series], fill=colour, width=2)
        for x, y in series:
            cx, cy = to_px(x, y)
            d.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
    out = Path(run) / "loss.png"
    fsio.atomic_write_with(out, lambda tmp: img.save(tmp, format="PNG"))
    return out


class MetricsInMemory:
    """Metrics' interface for the ranks other than 0 of a distributed run: kept in memory, never written."""

    def __init__(self):
        self.records: list[dict] = []

    @property
    def count(self) -> int:
        return len(self.records)

    def write(self, record: dict) -> None:
        self.records.append(record)

    def read(self) -> list[dict]:
        return list(self.records)
