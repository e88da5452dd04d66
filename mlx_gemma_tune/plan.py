"""Memory plans from a config alone: does a recipe train this model on an 8-64 GB Mac, and what makes it fit.

The model is built from its config.json by mlx-lm's own classes with lazy arrays (nothing is
allocated or read: every shape is the real one), cast to the checkpoint's dtype, quantized with
mlx-lm's quantize_model and the model's own quantization policy for QLoRA as `convert --quantize`
does, and given the recipe's adapter; memory.estimate() then predicts a training step's peak. The
configs of Gemma 3n E2B / E4B and Gemma 4 E2B / E4B / 26B-A4B / 31B ship in configs/ (rebuilt from
public facts: transformers' conversion scripts and published copies; their parameter counts match
the published totals), so a plan needs neither the weights nor the network.

A Mac's budget is Metal's recommended working set, WORKING_SET_SHARE of its memory (measured:
11.84 GB of a 16 GB M3, 17.76 GiB of a 24 GB Mac). When a setup does not fit, the switches are
tried in the order that costs least: gradient checkpointing (slower steps; train.grad_checkpoint: auto
checkpoints the fewest layers that fit, and so does the plan), QLoRA 4-bit (the
base quantized), a smaller batch (with gradient accumulation the effective batch stays), shorter
rows; the first combination that fits is reported.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlx_gemma_tune.errors import InputError

MAC_GB = (8, 16, 24, 32, 48, 64)
WORKING_SET_SHARE = 0.74
CONFIG_DIR = Path(__file__).parent / "configs"
MIN_SEQ = 256  # shorter rows than this are not offered as a fix
GIB = 2**30


def shipped_configs() -> dict[str, Path]:
    """{hub id: config file} of the configs that ship with the package."""
    return {f"google/{p.stem}": p for p in sorted(CONFIG_DIR.glob("*.json"))}


def read_config(model: str) -> tuple[str, dict]:
    """(name, config) of a shipped hub id, a config.json file, or a model directory (no weights read).
    Raises InputError for anything else, listing the shipped ids."""
    from mlx_gemma_tune import demo

    shipped = shipped_configs()
    if model in shipped:
        return model, json.loads(shipped[model].read_text())
    p = Path(demo.resolve_alias(model)).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        try:
            return model, json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"is not a JSON config ({exc})", where=str(p)) from None
    raise InputError("is neither a shipped config, a config.json nor a model directory", where=model,
                     hint="shipped: " + ", ".join(shipped))


@dataclass
class Setup:
    """What a recipe trains with: its name, base quantization (None, 4, 8), batch, rows, checkpointing."""
    name: str
    bits: int | None
    batch: int
    seq_len: int
    grad_checkpoint: bool | int | str | None  # "auto" / None: the fewest layers that fit (train's default)
    recipe: object = field(repr=False, default=None)


@dataclass
class PlanRow:
    setup: str
    mac_gb: int
    budget_gb: float  # GiB: the Mac's recommended working set
    estimate_gb: float  # GiB: the setup as the recipe says (auto: the fewest checkpointed layers that fit)
    fits: bool
    switches: list[str]  # what makes it fit, as --set KEY=VALUE assignments in order (empty: fits as is)
    fit_estimate_gb: float | None  # GiB with those switches; None when nothing tried fits
    batch: int | None  # the batch and row length that fit
    seq_len: int | None


@dataclass
class Plan:
    model: str
    parameters: int  # of the text model (the towers are not trained here)
    weights_gb: float  # GiB in the checkpoint's dtype
    rows: list[PlanRow]

    def to_dict(self) -> dict:
        return asdict(self)


def setups_for(model: str, recipe_refs: list[str] | None = None, sets: tuple[str, ...] = ()) -> list[Setup]:
    """The setups to plan: the given recipes; else the shipped recipes made for this hub id; else plain
    LoRA and QLoRA 4-bit with the recipe defaults."""
    from mlx_gemma_tune import prepare, recipe

    refs = recipe_refs or [name for name, _ in recipe.list_recipes() if not name.startswith("tasks/")
                           and recipe.read_yaml(recipe.find_recipe(name)).get("model", {}).get("path") == model]
    if not refs:
        base = prepare.resolve_recipe(None, model=model, data="-", sets=sets)[0]
        quantized = prepare.resolve_recipe(None, model=model, data="-", sets=(*sets, "model.quantize=4"))[0]
        return [_setup("lora (defaults)", base), _setup("qlora 4-bit (defaults)", quantized)]
    return [_setup(ref, prepare.resolve_recipe(ref, model=model, data="-", sets=sets)[0]) for ref in refs]


def _setup(name: str, r) -> Setup:
    return Setup(name, r.model.quantize, r.train.batch_size, r.data.max_seq_length, r.train.grad_checkpoint, r)


def plan(model: str, setups: list[Setup] | None = None, sizes: tuple[int, ...] = MAC_GB) -> Plan:
    """For each setup and Mac size: whether it fits and, if not, which switches make it fit (module doc)."""
    name, config = read_config(model)
    setups = setups if setups is not None else setups_for(model)
    built: dict = {}
    rows = []
    for s in setups:
        for gb in sizes:
            budget = WORKING_SET_SHARE * gb * GIB
            ckpt = "auto" if s.grad_checkpoint in (None, "auto") else s.grad_checkpoint
            as_is = _estimate(config, s, s.bits, s.batch, s.seq_len, ckpt, budget, built)
            row = PlanRow(s.name, gb, round(budget / GIB, 2), round(as_is.total_gb, 2), not as_is.over_budget, [],
                          round(as_is.total_gb, 2), s.batch, s.seq_len)
            if as_is.over_budget:
                _find_fit(config, s, budget, row, built)
            rows.append(row)
    model_obj, _ = _model(config, None, None, built)
    text_params, weight_bytes = _size(model_obj)
    return Plan(name, text_params, round(weight_bytes / GIB, 2), rows)


def _find_fit(config: dict, s: Setup, budget: float, row: PlanRow, built: dict) -> None:
    """The cheapest switches (module doc) that bring the setup under budget, written into row."""
    ckpt, bits, batch, seq, switches = "auto", s.bits, s.batch, s.seq_len, []
    if s.grad_checkpoint is not True and s.grad_checkpoint not in (None, "auto"):  # (auto: train turns it on)
        switches.append("train.grad_checkpoint=true")

    def est():
        return _estimate(config, s, bits, batch, seq, ckpt, budget, built)

    e = est()
    if e.over_budget and bits != 4:
        bits = 4
        switches.append("model.quantize=4")
        e = est()
    while e.over_budget and batch > 1:
        batch //= 2
        e = est()
    if batch != s.batch:
        switches.append(f"train.batch_size={batch} train.grad_accumulation={s.batch // batch}")
    while e.over_budget and seq // 2 >= MIN_SEQ:
        seq //= 2
        e = est()
    if seq != s.seq_len:
        switches.append(f"data.max_seq_length={seq}")
    if e.over_budget:
        row.switches, row.fit_estimate_gb, row.batch, row.seq_len = ["does not fit"], None, None, None
    else:
        row.switches, row.fit_estimate_gb, row.batch, row.seq_len = switches, round(e.total_gb, 2), batch, seq


def _estimate(config: dict, s: Setup, bits, batch: int, seq: int, ckpt, budget: float, built: dict):
    """memory.estimate() of setup s with these settings (every token a target: the worst case).
    ckpt: True / False / a number of checkpointed layers, or "auto": the fewest that fit, as train does."""
    from mlx_gemma_tune import checkpointing, memory

    model, adapter = _model(config, bits, s, built)

    eligible, weight_bytes = checkpointing.eligible_layers(model), memory.model_bytes(model) - 4 * adapter

    def at(n):
        return memory.estimate(config, weight_bytes=weight_bytes, adapter_parameters=adapter, batch=batch,
                               seq_len=seq, loss_chunk=s.recipe.train.loss_chunk, grad_checkpoint=n,
                               act_bytes=memory.activation_bytes(model), budget_bytes=int(budget),
                               eligible=eligible)

    return checkpointing.resolve(ckpt, len(eligible), at)


def _model(config: dict, bits, s: Setup | None, built: dict):
    """(lazy model in the checkpoint's dtype, quantized to `bits`, with s's adapter; adapter parameters),
    built once per (bits, adapter) and kept in `built`."""
    import contextlib
    import io

    import mlx.core as mx
    from mlx_lm.utils import quantize_model

    from mlx_gemma_tune import families, lora, models, upstream

    lo = s.recipe.lora if s is not None and s.recipe is not None else None
    key = (bits, s.recipe.model.ple if s is not None and s.recipe is not None else None,
           None if lo is None else (lo.rank, tuple(lo.targets) if isinstance(lo.targets, list) else lo.targets,
                                          lo.num_layers, lo.experts, lo.method))
    if key in built:
        return built[key]
    model_cls, args_cls = upstream.resolve("mlx_lm.utils:_get_classes")(config=config)
    model = model_cls(args_cls.from_dict(config))
    text = families.text_config(config)
    if "lm_head" in model and text.get("tie_word_embeddings", config.get("tie_word_embeddings", True)):
        model.tie_word_embeddings = True  # as mlx-lm's sanitize does for a checkpoint without lm_head.weight
        model.pop("lm_head")
    models.apply_fixes(model)
    dtype = text.get("dtype") or config.get("dtype") or config.get("torch_dtype")
    model.set_dtype(getattr(mx, dtype if dtype in ("bfloat16", "float16", "float32") else "bfloat16"))
    if bits:
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints a bits-per-weight line
            model, _ = quantize_model(model, dict(config), 64, bits,
                                      quant_predicate=getattr(model, "quant_predicate", None))
    if s is not None and s.recipe is not None and s.recipe.model.ple == "quantize":
        models.quantize_ple(model, evaluate=False)  # the shapes are all a plan needs
    adapter = 0
    if lo is not None:
        lora.apply(model, config, lora.LoraSettings(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout,
                                                    targets=lo.targets, num_layers=lo.num_layers,
                                                    experts=lo.experts, method=lo.method))
        adapter = lora.trainable_parameters(model)
    built[key] = (model, adapter)
    return built[key]


def _size(model) -> tuple[int, int]:
    from mlx.utils import tree_flatten

    flat = tree_flatten(model.parameters())
    return sum(v.size for _, v in flat), sum(v.nbytes for _, v in flat)


def readme_table(models: list[str] | None = None, sizes: tuple[int, ...] = MAC_GB) -> str:
    """The README's model-size table: per shipped config and recipe, the smallest Mac it fits as is, and
    what makes it fit on a 16 GB Mac (tests/test_docs.py keeps the README equal to this)."""
    lines = ["| model (parameters) | recipe | " + " | ".join(f"{gb} GB" for gb in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for model in models or list(shipped_configs()):
        p = plan(model, sizes=sizes)
        for setup in dict.fromkeys(r.setup for r in p.rows):
            cells = []
            for r in (r for r in p.rows if r.setup == setup):
                if r.fits:
                    cells.append(f"yes ({r.estimate_gb:.1f})")
                elif r.fit_estimate_gb is None:
                    cells.append("no")
                else:
                    cells.append(_short(r.switches) + f" ({r.fit_estimate_gb:.1f})")
            lines.append(f"| {model} ({p.parameters / 1e9:.1f}B) | {setup} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _short(switches: list[str]) -> str:
    names = {"train.grad_checkpoint": "ckpt", "model.quantize": "4-bit", "train.batch_size": "batch",
             "data.max_seq_length": "seq"}
    out = []
    for s in switches:
        key, _, value = s.split(" ")[0].partition("=")
        out.append(names[key] if key in ("train.grad_checkpoint", "model.quantize") else f"{names[key]} {value}")
    return " + ".join(out)
