"""Preparing a training run: recipe, run directory, base model, adapter layers and data.

Everything that can be wrong with the user's input is checked here, before the run
directory is created, so a refused run writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from mlx_gemma_tune import distributed, fsio
from mlx_gemma_tune import recipe as recipes
from mlx_gemma_tune.errors import InputError, OutputError, UserError


@dataclass
class Prepared:
    recipe: recipes.Recipe
    run_dir: Path
    model: object
    tokenizer: object
    config: dict
    lora: object  # lora.LoraSettings
    train: list
    valid: list
    base: Path
    resume_from: Path | None = None
    notes: dict = field(default_factory=dict)  # truncated / dropped / held_out counts, ple_saved_bytes
    world: distributed.World = distributed.SINGLE


def resolve_recipe(recipe_ref: str | None, *, model: str | None = None, data: str | None = None,
                   sets: tuple[str, ...] = ()) -> tuple[recipes.Recipe, str]:
    """The validated recipe (defaults < recipe < flags and --set) and its name."""
    raw, source, name, lines = {}, "recipe", "run", None
    if recipe_ref:
        path = recipes.find_recipe(recipe_ref)
        raw, source, name, lines = recipes.read_yaml(path), str(path), path.stem, recipes.yaml_lines(path)
    overrides = recipes.parse_set(list(sets))
    origins = recipes.set_origins(list(sets))
    if model:
        overrides["model.path"], origins["model.path"] = model, "--model"
    if data:
        overrides["data.path"], origins["data.path"] = data, "--data"
    return recipes.build(raw, overrides, source, origins=origins, lines=lines), name


def load_recipe(name_or_path: str | None = None, sets: tuple[str, ...] | list[str] = ()) -> recipes.Recipe:
    """A shipped recipe (by name, e.g. "gemma4-e2b-qlora" or "tasks/extraction") or a YAML file, with
    "key=value" overrides as `--set` gives them, resolved over the defaults and checked (types,
    ranges, unknown keys with a did-you-mean). None: the defaults alone. Raises InputError naming the
    file and line, or the --set, of each bad value."""
    return resolve_recipe(name_or_path, sets=tuple(sets))[0]


def prepare_run(recipe_ref: str | None = None, *, model: str | None = None, data: str | None = None,
                out: str | None = None, sets: tuple[str, ...] = (), resume: str | None = None,
                force: bool = False, progress: Callable[[str], None] | None = None,
                world: distributed.World = distributed.SINGLE) -> Prepared:
    """Everything a run needs, checked, phase by phase: the recipe and run directory (new, or the one
    `resume` continues), the dataset and base model, the examples, the adapter layers; the run
    directory is written last, once nothing can fail. Distributed: every rank calls this; rank 0
    alone reads and writes the run directory and sends the others what they need (the recipe of a
    resumed run). Raises UserError (and its subclasses) for anything the user can fix."""
    say = progress or (lambda _m: None)
    if resume:
        if recipe_ref or model or data or out:
            raise UserError("--resume continues a run as recorded in its recipe.yaml; do not combine it with a "
                            "recipe, --model, --data or -o", hint="to train longer: --set train.iters=N (or "
                            "train.epochs); to start from its adapter: a new run with --set lora.init_from=RUN")
        recipe, run_dir, resume_from = _resumed_run(Path(resume).expanduser(), world, list(sets), say)
        if recipe.train.objective == "dpo" and resume_from is not None:
            from mlx_gemma_tune import preference

            preference.check_reference(run_dir)
    else:
        recipe, run_dir = _new_run(recipe_ref, model, data, out, sets, force, world)
        resume_from = None
    if recipe.train.batch_size < world.size:
        raise UserError(f"train.batch_size {recipe.train.batch_size} is the global batch, smaller than the "
                        f"{world.size} processes: some would never have a row",
                        hint=f"--set train.batch_size={world.size} (or more)")
    splits, base, (model_obj, tokenizer, config), images = _inputs(recipe, world, say)
    say("Tokenizing" + (" and reading the images / audio" if images else ""))
    train, valid, notes = _examples(tokenizer, splits, recipe, images)
    if recipe.model.ple == "quantize":
        from mlx_gemma_tune import models

        notes["ple_saved_bytes"] = models.quantize_ple(model_obj)
    if resume:
        _check_steps_left(run_dir, resume_from, recipe, train, world)
    settings = _adapter_layers(model_obj, config, recipe, images)
    prepared = Prepared(recipe=recipe, run_dir=run_dir, model=model_obj, tokenizer=tokenizer, config=config,
                        lora=settings, train=train, valid=valid, base=base, resume_from=resume_from, notes=notes,
                        world=world)
    from mlx_gemma_tune import memory, schedule

    memory.check_fits(prepared, schedule.plan([len(e.tokens) for e in train], recipe)[0], ranks=world.size)
    if resume and sets and world.main:  # a run trained longer: its recipe.yaml records the new total
        from mlx_gemma_tune import rundir

        rundir.write_recipe(run_dir, recipe)
    if resume_from is not None:
        from mlx_gemma_tune import hf_checkpoint, lora

        weights = hf_checkpoint.load_safetensors(resume_from / lora.ADAPTER_WEIGHTS) if world.main else None
        model_obj.load_weights(list(distributed.broadcast_arrays(weights, world).items()), strict=False)
    elif not resume and world.main:
        _write_run_dir(run_dir, recipe, base, force)
    return prepared


EXTENDABLE = ("train.iters", "train.epochs")  # what --set may change when --resume continues a run


def _resumed_run(run_dir: Path, world, sets: list[str], say) -> tuple[recipes.Recipe, Path, Path | None]:
    """(recipe, run directory, last complete checkpoint or None) of the run `--resume` continues;
    `sets` may raise train.iters / train.epochs to train a run longer (its recipe.yaml is updated).
    A finished run without such a --set is one clear line."""
    import json

    from mlx_gemma_tune import rundir

    extend = recipes.parse_set(sets)
    for key in extend:
        if key not in EXTENDABLE:
            raise UserError(f"--resume: {key} cannot change in a run being continued (only {' or '.join(EXTENDABLE)}, "
                            "to train longer)", hint="start a new run from its adapter: --set lora.init_from=RUN")
    raw, resume_from = None, None
    if world.main:
        if not (run_dir / "recipe.yaml").is_file():
            raise InputError("is not a run directory (no recipe.yaml)", where=str(run_dir))
        raw = recipes.read_yaml(run_dir / "recipe.yaml")
        summary = run_dir / "summary.json"
        done_run = json.loads(summary.read_text()) if summary.is_file() else None
        if done_run and not done_run.get("interrupted") and not extend:
            raise UserError(f"has finished: step {done_run['steps']} of {done_run['total_steps']}"
                            + (" (stopped early)" if done_run.get("stopped_early") else ""), where=str(run_dir),
                            hint=f"train it longer with --resume {run_dir} --set train.iters=N (N > "
                                 f"{done_run['steps']}), or start a new run from its adapter with "
                                 f"--set lora.init_from={run_dir}")
        if extend:  # the recorded recipe, trained longer (written back once the steps are checked)
            say(f"Continuing {run_dir} with {', '.join(sets)}: the learning-rate schedule is re-planned over the "
                "new total")
        fsio.remove_leftovers(run_dir)  # what a killed run was writing: never complete, never used
        done = rundir.list_checkpoints(run_dir)
        resume_from = done[-1] if done else None  # killed before its first checkpoint: start again
    shared = distributed.broadcast_json(
        {"recipe": raw, "resume_from": str(resume_from) if resume_from else None} if world.main else None, world)
    if "train.epochs" in extend and "train.iters" not in extend:
        extend["train.iters"] = None  # epochs count only without iters
    recipe = recipes.build(shared["recipe"], extend, source=str(run_dir / "recipe.yaml"),
                           origins=recipes.set_origins(sets))
    return recipe, run_dir, Path(shared["resume_from"]) if shared["resume_from"] else None


def _check_steps_left(run_dir: Path, resume_from: Path | None, recipe: recipes.Recipe, train: list, world) -> None:
    """A continued run must have steps left to train."""
    import json

    from mlx_gemma_tune import schedule

    done = json.loads((resume_from / "state.json").read_text())["step"] if resume_from and world.main else 0
    total = schedule.plan([len(e.tokens) for e in train], recipe)[3]
    done = distributed.broadcast_json(done if world.main else None, world)
    if done >= total:
        raise UserError(f"has nothing left to train: {done} steps are done and the recipe asks for {total}",
                        where=str(run_dir), hint=f"train it longer: --resume {run_dir} --set train.iters=N (N > {done})")


def _new_run(recipe_ref, model, data, out, sets, force: bool, world) -> tuple[recipes.Recipe, Path]:
    """(recipe, run directory) of a new run; the directory is checked, not yet written."""
    recipe, name = resolve_recipe(recipe_ref, model=model, data=data, sets=sets)
    stamp = f"{datetime.now().astimezone():%Y%m%d-%H%M%S}"  # local time
    run_dir = Path(out).expanduser() if out else Path("runs") / f"{name}-{stamp}"
    run_dir = Path(distributed.broadcast_json(str(run_dir) if world.main else None, world))
    exists = run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir()))
    if world.main and exists and not force:  # only rank 0 has (and writes) the run directory
        raise OutputError("already exists", where=str(run_dir),
                          hint="pass --resume to continue it, or --force to replace it")
    for src in (recipe.model.path, recipe.data.path):
        s = Path(src).expanduser()
        if s.exists() and (run_dir.resolve() == s.resolve() or s.resolve() in run_dir.resolve().parents):
            raise OutputError("is inside an input", where=str(run_dir), hint="choose another run directory")
    return recipe, run_dir


def _inputs(recipe: recipes.Recipe, world, say):
    """(dataset splits, base model directory, (model, tokenizer, config), has images or audio): the
    inputs, read and checked before anything is written. The base is converted (rank 0 first) when
    it is not in the cache yet."""
    from mlx_gemma_tune import convert, dataset_files, models

    say("Reading the dataset")
    splits = dataset_files.read_splits(recipe.data.path)
    say("Preparing the base model")
    from mlx_gemma_tune import demo

    source = str(demo.resolve_alias(recipe.model.path, say))  # "demo": the bundled Gemma 3 270M
    if not world.main:
        distributed.barrier(world)  # rank 0 converts (or downloads) first; the others find it cached
    base = convert.ensure_base(source, recipe.model.quantize, progress=say)
    if world.main:
        distributed.barrier(world)
    rows = [r for split in splits.values() for r in split or []]
    audio = any(dataset_files.media_of(r.messages, "audio") for r in rows)
    images = audio or any(dataset_files.media_of(r.messages, "image") for r in rows)  # multimodal: mlx-vlm
    say("Loading the base model" + (" with its towers (mlx-vlm)" if images else ""))
    loaded = _vision_model(base, recipe, audio) if images else models.load(base)
    return splits, base, loaded, images


def _adapter_layers(model_obj, config: dict, recipe: recipes.Recipe, images: bool):
    """The recipe's LoRA / DoRA layers put on the model (seeded by train.seed); their lora.LoraSettings."""
    import mlx.core as mx

    from mlx_gemma_tune import lora

    mx.random.seed(recipe.train.seed)  # adapter initialisation
    lo = recipe.lora
    settings = lora.LoraSettings(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, method=lo.method,
                                 targets=lo.targets, num_layers=lo.num_layers, experts=lo.experts,
                                 base_model=recipe.model.path)
    if lo.vision_projector:
        if not images:
            raise UserError("lora.vision_projector applies to runs on image data", where="lora.vision_projector",
                            hint="add image rows, or set lora.vision_projector: false")
        if lo.method == "dora":
            raise UserError("the vision projector takes LoRA, not DoRA", where="lora.vision_projector",
                            hint="set lora.method: lora, or lora.vision_projector: false")
        from mlx_gemma_tune import families, multimodal

        settings.modules = families.lora_targets(model_obj, config, lo.targets, lo.num_layers, lo.experts) + [
            multimodal.PROJECTOR]
    lora.apply(model_obj, config, settings)
    if lo.init_from:
        _init_from(model_obj, Path(lo.init_from).expanduser())
    return settings


def _init_from(model_obj, source: Path) -> None:
    """The adapter of `source` (a run or adapter directory) as this run's starting point; it must fit
    the run's adapter layers exactly (same base, rank, targets, method). Raises UserError."""
    from mlx.utils import tree_flatten

    from mlx_gemma_tune import hf_checkpoint, lora

    weights_file = source / lora.ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise InputError(f"has no adapter ({lora.ADAPTER_WEIGHTS}) to start from", where=str(source),
                         hint="lora.init_from takes a run directory or an adapter directory")
    weights = hf_checkpoint.load_safetensors(weights_file)
    own = dict(tree_flatten(model_obj.trainable_parameters()))
    misfit = ([f"{k} is missing" for k in own if k not in weights] + [f"{k} is extra" for k in weights if k not in own]
              + [f"{k} is {tuple(weights[k].shape)}, not {tuple(own[k].shape)}" for k in own
                 if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)])
    if misfit:
        raise UserError(f"the adapter in {source} does not fit this run's adapter layers ({len(misfit)} differences, "
                        f"e.g. {misfit[0]})", where="lora.init_from",
                        hint="use the base model, lora.rank, lora.targets and lora.method of the run it came from")
    model_obj.load_weights(list(weights.items()), strict=False)


def _write_run_dir(run_dir: Path, recipe: recipes.Recipe, base: Path, force: bool) -> None:
    """The new run directory: its resolved recipe.yaml and the base it trains on (base.json)."""
    from mlx_gemma_tune import rundir

    if run_dir.exists() and force:
        fsio.remove_dir(run_dir) if run_dir.is_dir() else run_dir.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_recipe(run_dir, recipe)
    rundir.record_base(run_dir, base, recipe.model.path, recipe.model.quantize)


def _vision_model(base: Path, recipe: recipes.Recipe, audio: bool = False):
    """(mlx-vlm model with the towers, processor, config) for a run whose dataset has images or audio."""
    from mlx_gemma_tune import hf_checkpoint, multimodal

    source = multimodal.vision_source(base)
    config = hf_checkpoint.read_config(source)
    multimodal.check_model(config, str(source), audio)
    if recipe.model.quantize:
        raise UserError("model.quantize is not supported for image / audio fine-tuning yet", where="model.quantize",
                        hint="train the float model (LoRA on the language model keeps the memory small)")
    if recipe.data.pack:
        raise UserError("data.pack cannot pack image or audio rows", where="data.pack", hint="set data.pack: false")
    model, processor = multimodal.load(source, audio=audio)
    return model, processor, config


def _examples(tokenizer, splits: dict, recipe: recipes.Recipe, images: bool = False):
    import numpy as np

    from mlx_gemma_tune import data, multimodal

    d = recipe.data
    notes = {"truncated": 0, "dropped": 0, "held_out": 0}
    pairs = recipe.train.objective != "sft"
    if pairs and (images or d.pack):
        raise UserError(f"train.objective {recipe.train.objective} trains on text preference pairs, one per row",
                        where="train.objective", hint="set data.pack: false (and train images with sft)")
    if pairs and not (recipe.train.beta > 0 and recipe.train.orpo_lambda >= 0):
        raise UserError("train.beta must be > 0 and train.orpo_lambda >= 0", where="train.beta")
    if not pairs and recipe.train.early_stopping_metric == "reward_accuracy":
        raise UserError("reward_accuracy is a preference metric: it needs train.objective dpo or orpo",
                        where="train.early_stopping_metric", hint="use loss, or train preference pairs")

    def encode(rows):
        out = []
        for row in rows:
            if images:
                if not row.messages:
                    raise InputError("image / audio fine-tuning needs chat rows (messages)", where=row.where)
                encoded = multimodal.encode_row(tokenizer, row, d.mask_prompt, d.reasoning)
            else:  # one per turn on 26B/31B templates and for rows with reasoning
                encoded = data.encode_row(tokenizer, row, d.mask_prompt, d.reasoning, pairs=pairs)
            for ex in encoded:
                fitted = data.fit_length(ex, d.max_seq_length, d.overlong)
                if fitted is None:
                    notes["dropped"] += 1
                    continue
                notes["truncated"] += fitted is not ex
                if sum(fitted.mask[1:]):
                    out.append(fitted)
                else:
                    notes["dropped"] += 1  # nothing left to learn from after truncation
        return out

    train = encode(splits["train"])
    valid = encode(splits["valid"]) if splits.get("valid") else []
    rows = list(dict.fromkeys(e.source for e in train))  # a row's examples (one per turn) stay together
    if not splits.get("valid") and d.valid_fraction > 0 and len(rows) >= 2:
        order = np.random.default_rng(recipe.train.seed).permutation(len(rows))
        n_valid = max(1, round(d.valid_fraction * len(rows)))
        held = {rows[i] for i in order[:n_valid].tolist()}
        valid = [e for e in train if e.source in held]
        train = [e for e in train if e.source not in held]
        notes["held_out"] = n_valid
    if not train:
        raise InputError("has no training rows left (after holding out validation rows and dropping overlong ones)",
                         where=str(d.path))
    return train, valid, notes


def train(recipe: str | None = None, *, model: str | None = None, data: str | None = None, out: str | None = None,
          sets: tuple[str, ...] | list[str] = (), resume: str | None = None, force: bool = False,
          progress: Callable[[str], None] | None = None, callback=None, loss=None):
    """Train a LoRA / QLoRA / DoRA adapter, as `mlx-gemma-tune train` does; returns a
    train_state.TrainSummary.

    `recipe` is a shipped recipe name or a YAML path (None: the defaults); model / data / out override
    model.path, data.path and the run directory; `sets` are "key=value" overrides (`--set`); `resume`
    continues a run directory exactly. The base is converted (and quantized for QLoRA) into the cache
    on first use. `progress(message)` hears each preparation stage; `callback` (a
    train_state.TrainCallback) gets the trainer's typed reports; `loss` replaces the objective
    (train_state.LossFunction; default the masked cross-entropy). Training itself is mlx-lm's
    LoRA layers on our loop: chunked loss over the vocabulary, masks from the chat template, exact
    resume. Raises UserError (and its subclasses) for bad recipes, data, models or run directories."""
    from mlx_gemma_tune import trainer

    prepared = prepare_run(recipe, model=model, data=data, out=out, sets=tuple(sets), resume=resume, force=force,
                           progress=progress)
    return trainer.run(prepared, callback=callback, loss=loss)
