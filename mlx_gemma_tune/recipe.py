"""Training recipes: one schema (dataclasses) holds every field, its default and its help.

Precedence: defaults < recipe YAML < dedicated CLI flags and --set key=value. Every problem (unknown
key, wrong type, missing value) is collected and reported at once, with a did-you-mean for misspelt keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mlx_gemma_tune.errors import InputError
from mlx_gemma_tune.recipe_yaml import parse_set, read_yaml, set_origins, yaml_lines  # noqa: F401 (recipe's API)

RECIPES_DIR = Path(__file__).parent / "recipes"
REQUIRED = "<required>"


def _f(default, help: str, choices: tuple | None = None):
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = _f(REQUIRED, "Base model: a directory made by `convert`, a Hugging Face Gemma directory or a hub id.")
    quantize: int | None = _f(None, "Quantize the base to 4 or 8 bits before training (QLoRA); the "
                                        "converted copy is cached. null keeps the base as it is.", (None, 4, 8))
    ple: str = _f("quantize", "Gemma 3n / 4 E models: the per-layer-embedding table (E2B: 4.7 GB in bf16) is held "
                  "8-bit in training, its rows dequantized as gathered; keep: as released.", ("quantize", "keep"))


@dataclass
class DataConfig:
    path: str = _f(REQUIRED, "Dataset: a JSONL/JSON/CSV/Parquet file, a folder with train/valid/test files, a "
                   "save_to_disk folder, a hub dataset id (online), or example:NAME for a shipped example.")
    valid_fraction: float = _f(0.1, "Share of the training rows held out (seeded) when there is no validation split.")
    max_seq_length: int = _f(2048, "Longest row in tokens; longer rows are handled as `overlong` says.")
    overlong: str = _f("truncate", "What to do with rows over max_seq_length.", ("truncate", "drop", "error"))
    mask_prompt: bool = _f(True, "Train only on assistant turns (every turn). false trains on all tokens.")
    reasoning: str = _f("train", "Assistant turns with a thought (reasoning_content, or a <|channel>thought block): "
                        "train it as Gemma 4 thinks (thinking on; other families refuse it), drop it (answers "
                        "only), or error.", ("train", "drop", "error"))
    pack: bool = _f(False, "Pack rows into sequences of up to max_seq_length tokens (attention stays within a row; "
                    "batch_size counts sequences). Pays when padding dominates (benchmarks/train_speed.py).")


@dataclass
class LoraConfig:
    method: str = _f("lora", "lora (also QLoRA when the base is quantized) or dora.", ("lora", "dora"))
    rank: int = _f(16, "Adapter rank r (8-64 is typical).")
    alpha: float = _f(32.0, "LoRA alpha; the update is scaled by alpha / rank (mlx-lm's `scale`).")
    dropout: float = _f(0.05, "Dropout on the adapter input.")
    targets: str | list = _f("all", "all, attention, mlp, or a list of names such as [q_proj, v_proj].")
    num_layers: int | None = _f(None, "Adapt only the last N decoder layers; null = all layers.")
    experts: bool = _f(False, "Also adapt MoE expert layers (Gemma 4 26B-A4B; not with DoRA).")
    vision_projector: bool = _f(False, "Image runs (Gemma 4): also adapt the vision projector (LoRA, not DoRA).")
    init_from: str | None = _f(None, "Start from the adapter of a run (or an adapter directory) instead of a fresh "
                                     "one, e.g. more data after a first run; same base, rank, targets and method.")


@dataclass
class TrainConfig:
    lr: float = _f(2e-4, "Peak learning rate (AdamW).")
    schedule: str = _f("cosine", "Decay after warm-up.", ("cosine", "linear", "constant"))
    warmup_ratio: float = _f(0.1, "Share of the steps spent warming up linearly from 0.")
    epochs: float = _f(3.0, "Passes over the training rows (ignored when iters is set).")
    iters: int | None = _f(None, "Optimizer steps to run; overrides epochs.")
    batch_size: int = _f(4, "Rows per micro-batch; with --distributed the global micro-batch, split across the processes.")
    grad_accumulation: int = _f(1, "Micro-batches per optimizer step (effective batch = batch_size x this).")
    max_grad_norm: float | None = _f(1.0, "Clip the gradient norm to this; null = no clipping.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    seed: int = _f(0, "Seed for data order, the held-out split, adapter init and dropout.")
    report_every: int = _f(10, "Steps between training reports (dashboard and metrics.jsonl).")
    eval_every: int = _f(50, "Steps between validation runs (and at the end).")
    save_every: int = _f(100, "Steps between checkpoints (and at the end).")
    keep_checkpoints: int = _f(3, "How many recent checkpoints to keep (the best one is kept as well).")
    early_stopping_patience: int | None = _f(None, "Stop after this many validations without a new "
                                                        "best validation loss; null = never stop early.")
    early_stopping_metric: str = _f("loss", "What the best adapter and early stopping follow: the validation loss, "
                                    "or (dpo / orpo) the held-out reward accuracy.", ("loss", "reward_accuracy"))
    compile: bool = _f(True, "Compile the training step with mx.compile (faster); false to debug.")
    loss_chunk: int | None = _f(192, "Target tokens per slice of logits in the chunked loss (full logits are "
                                          "never held); null = the plain loss over full logits.")
    grad_checkpoint: bool | int | str | None = _f("auto", "Recompute layers in the backward pass instead of keeping "
                                                  "their activations: auto = the fewest layers that make the memory "
                                                  "estimate fit the machine's budget (none when it fits); a number = "
                                                  "that many layers (the first ones); true = all; false = none.",
                                                  ("auto",))
    val_batches: int | None = _f(None, "Limit each validation to this many batches; null = all.")
    objective: str = _f("sft", "sft: next-token loss on the answers; dpo / orpo: preference pairs (prompt, chosen, "
                        "rejected), see README 'Preference tuning'.", ("sft", "dpo", "orpo"))
    beta: float = _f(0.1, "dpo: DPO's beta, how far from the reference the tuned model may move (IPO: its tau).")
    dpo_loss: str = _f("sigmoid", "dpo: sigmoid (DPO) or ipo (IPO, per-token average log-probabilities).",
                       ("sigmoid", "ipo"))
    orpo_lambda: float = _f(0.1, "orpo: ORPO's lambda, the odds-ratio term's weight beside the chosen answers' loss.")
    memory_guard: bool = _f(True, "Refuse to start when the estimated peak memory (with gradient checkpointing "
                                  "where it is allowed) exceeds this machine's budget; false starts anyway.")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTION_CLASSES = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "train": TrainConfig}


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)]


def field_help() -> list[tuple[str, object, str]]:
    """(key, default, help) for every field, for documentation and `recipes show`."""
    return [(f"{s}.{f.name}", _default(f), f.metadata["help"])
            for s, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)]


def _default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def default(key: str):
    """The default of a recipe key ("data.max_seq_length"), from the schema: the one home of every
    training default, which the CLI options, eval and data check read too."""
    section, _, name = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(_SECTION_CLASSES[section])}
    return _default(fields[name])


# ---- finding and reading recipes ------------------------------------------------------------


def list_recipes() -> list[tuple[str, str]]:
    """(name, first line of its header comment) for every shipped recipe, e.g. "tasks/extraction"."""
    out = []
    for p in sorted(RECIPES_DIR.rglob("*.yaml")):
        first = next((line.lstrip("# ").strip() for line in p.read_text().splitlines() if line.startswith("#")), "")
        out.append((p.relative_to(RECIPES_DIR).with_suffix("").as_posix(), first))
    return out


def find_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = [n for n, _ in list_recipes()]
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "see `mlx-gemma-tune recipes list`"
    raise InputError("is neither a recipe file nor a shipped recipe name", where=name_or_path, hint=hint)


# ---- building a validated Recipe ------------------------------------------------------------


def build(raw: dict | None = None, overrides: dict[str, object] | None = None, source: str = "recipe", *,
          origins: dict[str, str] | None = None, lines: dict[str, int] | None = None) -> Recipe:
    """Defaults < raw (nested, from YAML) < overrides (flat dotted keys). All problems at once, each
    named by its value's origin: the recipe file and line (`lines`, from yaml_lines), the flag or
    `--set` of an override (`origins`, from set_origins; else "--set KEY"). Raises InputError."""
    problems: list[tuple[str, str]] = []  # (origin, message)
    values: dict[str, dict] = {s: {} for s in _SECTION_CLASSES}
    from_override: dict[str, str] = {}
    lines = lines or {}

    def in_file(key: str) -> str:
        return f"{source}:{lines[key]}" if key in lines else source

    for section, body in (raw or {}).items():
        if section not in _SECTION_CLASSES:
            problems.append((in_file(str(section)), _unknown(str(section), list(_SECTION_CLASSES), "section")))
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append((in_file(str(section)), f"'{section}' must be a mapping of keys"))
            continue
        for key, value in body.items():
            values[section][str(key)] = value
    for dotted, value in (overrides or {}).items():
        origin = (origins or {}).get(dotted, f"--set {dotted}")
        section, _, key = dotted.partition(".")
        if section not in _SECTION_CLASSES or not key:
            problems.append((origin, _unknown(dotted, all_keys(), "key")))
            continue
        values[section][key] = value
        from_override[dotted] = origin

    sections = {}
    for section, cls in _SECTION_CLASSES.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values[section].items():
            dotted = f"{section}.{key}"
            origin = from_override.get(dotted) or in_file(dotted)
            if key not in fields:
                problems.append((origin, _unknown(dotted, all_keys(), "key")))
                continue
            ok, converted, why = _check(fields[key], value)
            if ok:
                kwargs[key] = converted
            else:
                problems.append((origin, f"{dotted}: {why}"))
        obj = cls(**kwargs)
        for f in dataclasses.fields(cls):
            if getattr(obj, f.name) == REQUIRED:
                why = f"{section}.{f.name} is required (set it in the recipe, with a flag, or --set {section}.{f.name}=...)"
                problems.append((source, why))
        sections[section] = obj
    if not problems:
        problems += [(source, p) for p in _semantic(sections)]
    if problems:
        where = problems[0][0]
        raise InputError("; ".join(m if o == where else f"{o}: {m}" for o, m in problems), where=where)
    return Recipe(**sections)


# Names other trainers (transformers, PEFT, mlx-lm) use for our fields.
OTHER_NAMES = {"learning_rate": "train.lr", "lr_scheduler_type": "train.schedule", "lr_schedule": "train.schedule",
               "num_train_epochs": "train.epochs", "num_epochs": "train.epochs", "max_steps": "train.iters",
               "per_device_train_batch_size": "train.batch_size",
               "gradient_accumulation_steps": "train.grad_accumulation", "max_grad_norm": "train.max_grad_norm",
               "r": "lora.rank", "lora_r": "lora.rank", "lora_rank": "lora.rank", "lora_alpha": "lora.alpha",
               "lora_dropout": "lora.dropout", "target_modules": "lora.targets", "use_dora": "lora.method",
               "max_seq_len": "data.max_seq_length", "max_length": "data.max_seq_length",
               "max_seq_length": "data.max_seq_length", "packing": "data.pack",
               "gradient_checkpointing": "train.grad_checkpoint", "warmup_steps": "train.warmup_ratio"}


def _unknown(key: str, known: list[str], what: str) -> str:
    alias = OTHER_NAMES.get(key.rsplit(".", 1)[-1])
    close = [alias] if alias and alias in known and alias != key else \
        difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close and "." in key:  # a misspelt leaf, or the right leaf in the wrong section
        leaves = {k.rsplit(".", 1)[1]: k for k in known}
        leaf = difflib.get_close_matches(key.rsplit(".", 1)[1], list(leaves), n=1, cutoff=0.6)
        close = [leaves[leaf[0]]] if leaf else []
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown {what} '{key}'{hint}"


def _check(f: dataclasses.Field, value):
    """(ok, converted value, why not) for one field's value."""
    choices = f.metadata.get("choices")
    hint = typing.get_type_hints(_owner(f))[f.name]
    optional = type(None) in typing.get_args(hint)
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if value is None:
        return (True, None, "") if optional else (False, None, "must not be null")
    # `str | list` (targets); typing.Union for the typing.Union[...] spelling
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and str in base and list in base:
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return True, value, ""
        return False, None, f"expected a name or a list of names, got {value!r}"
    kind = base[0]
    if bool in base and int in base:  # a switch that also takes a count or a named choice (grad_checkpoint)
        if isinstance(value, bool) or (isinstance(value, int) and value >= 0) or (choices and value in choices):
            return True, value, ""
        return False, None, f"expected true, false, a number of layers or {' or '.join(choices)}, got {value!r}"
    if kind is bool:
        if isinstance(value, bool):
            return True, value, ""
        return False, None, f"expected true or false, got {value!r}"
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return False, None, f"expected a whole number, got {value!r}"
    elif kind is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return False, None, f"expected a number, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, None, f"expected a number, got {value!r}"
        value = float(value)
    elif kind is str and not isinstance(value, str):
        return False, None, f"expected text, got {value!r}"
    if choices and value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        return False, None, f"must be one of {shown}, got {value!r}"
    return True, value, ""


def _owner(f: dataclasses.Field):
    for cls in _SECTION_CLASSES.values():
        if any(g is f for g in dataclasses.fields(cls)):
            return cls
    raise KeyError(f.name)


def _semantic(s: dict) -> list[str]:
    """Values of the right type that still make no sense."""
    p = []
    t, lo, d = s["train"], s["lora"], s["data"]
    if t.lr <= 0:
        p.append(f"train.lr must be positive, got {t.lr}")
    if lo.rank < 1:
        p.append(f"lora.rank must be at least 1, got {lo.rank}")
    if lo.alpha <= 0:
        p.append(f"lora.alpha must be positive, got {lo.alpha}")
    if not 0 <= lo.dropout < 1:
        p.append(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    if not 0 <= t.warmup_ratio < 1:
        p.append(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if not 0 <= d.valid_fraction < 1:
        p.append(f"data.valid_fraction must be in [0, 1), got {d.valid_fraction}")
    for key in ("batch_size", "grad_accumulation", "report_every", "eval_every", "save_every", "keep_checkpoints"):
        if getattr(t, key) < 1:
            p.append(f"train.{key} must be at least 1, got {getattr(t, key)}")
    if t.iters is not None and t.iters < 1:
        p.append(f"train.iters must be at least 1, got {t.iters}")
    if t.iters is None and t.epochs <= 0:
        p.append(f"train.epochs must be positive, got {t.epochs}")
    if t.loss_chunk is not None and t.loss_chunk < 1:
        p.append(f"train.loss_chunk must be at least 1 (or null for the plain loss), got {t.loss_chunk}")
    if d.max_seq_length < 8:
        p.append(f"data.max_seq_length must be at least 8, got {d.max_seq_length}")
    if lo.experts and lo.method == "dora":
        p.append("lora.experts cannot be used with lora.method: dora (mlx-lm has no DoRA switch layer)")
    return p


def to_yaml(recipe: Recipe, header: str = "") -> str:
    import yaml

    body = yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False)
    return header + body


def reference_table() -> str:
    """The recipe reference as a Markdown table (the README embeds it; a test keeps them equal)."""
    import yaml

    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, help in field_help():
        shown = "required" if default == REQUIRED else yaml.safe_dump(default, default_flow_style=True).strip()
        shown = shown.removesuffix("...").strip()
        rows.append(f"| `{key}` | `{shown}` | {help} |")
    return "\n".join(rows) + "\n"
