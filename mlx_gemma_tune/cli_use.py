"""CLI commands that use and ship a tuned model: chat, generate, fuse, export.

cli.py adds COMMANDS to its `cli` group; same rules: parse, call one library function, show the result
through ui.
"""

from __future__ import annotations

import click

from mlx_gemma_tune.errors import UserError
from mlx_gemma_tune.generate import Sampling


def sampling_options(f):
    """The sampling options chat and generate share."""
    s = Sampling()  # the one home of the sampling defaults
    for opt in reversed([
        click.option("--temp", type=click.FloatRange(min=0), default=s.temp, show_default=True,
                     help="Sampling temperature; 0 = greedy."),
        click.option("--top-k", type=click.IntRange(min=0), default=s.top_k, show_default=True, help="0 = off."),
        click.option("--top-p", type=click.FloatRange(0, 1), default=s.top_p, show_default=True, help="1 = off."),
        click.option("--min-p", type=click.FloatRange(0, 1), default=s.min_p, show_default=True),
        click.option("--max-tokens", type=click.IntRange(min=1), default=s.max_tokens, show_default=True),
        click.option("--seed", type=int, default=None, help="Seed for reproducible sampling."),
        click.option("--system", default=None, help="System prompt."),
        click.option("--thinking/--no-thinking", default=False, show_default=True,
                     help="Gemma 4: thinking on in the chat template; the model may think before it answers, and "
                          "the thought is shown apart (--json: its own field)."),
        click.option("--tools", "tools_file", type=click.Path(dir_okay=False), default=None,
                     help="Gemma 4: a JSON file of tools (OpenAI shape) the model may call; calls are shown apart "
                          "(chat asks you for each result; --json: their own field)."),
        click.option("--adapter", type=click.Path(file_okay=False), default=None,
                     help="LoRA/DoRA adapter directory (a run directory's own adapter is used by default)."),
        click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False),
                     help="An image for the (first) prompt; loads the vision tower (Gemma 4). Repeatable."),
        click.option("--audio", "audio", multiple=True, type=click.Path(dir_okay=False),
                     help="An audio clip for the (first) prompt; loads the audio tower (Gemma 4 E2B/E4B). Repeatable."),
    ]):
        f = opt(f)
    return f


def _open_session(model_or_run, adapter, system, thinking, tools_file, temp, top_k, top_p, min_p, max_tokens, seed,
                  images=(), audio=()):
    from mlx_gemma_tune.generate import ChatSession, Sampling
    from mlx_gemma_tune.tools import read_tools_file

    tools = read_tools_file(tools_file) if tools_file else None  # a bad file fails before the model loads
    sampling = Sampling(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, max_tokens=max_tokens, seed=seed)
    return ChatSession.open(model_or_run, adapter, images=bool(images), audio=bool(audio), system=system,
                            sampling=sampling, thinking=thinking, tools=tools)


def _readable(session, text: str) -> str:
    """A whole reply as /compare shows it: the answer without its thought, each tool call on a line."""
    from mlx_gemma_tune.thinking import split
    from mlx_gemma_tune.tools import split_calls
    from mlx_gemma_tune.ui import chat as ui_chat

    answer = split(text)[1].strip()
    return ui_chat.with_calls(*split_calls(answer)) if session.tools else answer


def _reply_parts(pieces):
    """A streamed reply as ui.chat.stream_reply shows it: thought, answer and tool calls apart."""
    from mlx_gemma_tune.thinking import thought_and_answer
    from mlx_gemma_tune.tools import calls_apart

    return calls_apart(thought_and_answer(pieces))


@click.command()
@click.argument("model_or_run")
@sampling_options
def chat(model_or_run, adapter, system, thinking, tools_file, temp, top_k, top_p, min_p, max_tokens, seed, images,
         audio):
    """Chat with MODEL_OR_RUN (a model directory, or a run directory: its base + adapter).

    Type /help for the commands: /adapter PATH|off|on, /compare, /thought, /system, /temp, /topk,
    /topp, /max, /reset, /save FILE, /quit. With --image / --audio, they go with your first message.
    With --tools, when the model calls a tool you type its result and the model goes on.
    """
    from mlx_gemma_tune import ui
    from mlx_gemma_tune.chat_commands import run_command
    from mlx_gemma_tune.ui import chat as ui_chat

    with ui.status("Loading the model" + (" and its towers" if images or audio else "")):
        session = _open_session(model_or_run, adapter, system, thinking, tools_file, temp, top_k, top_p, min_p,
                                max_tokens, seed, images, audio)
    pending, pending_audio = list(images), list(audio)
    ui_chat.chat_note(f"model {session.base_path}" + (f" + adapter {session.adapter}" if session.adapter else "")
                 + " — /help for commands, /quit to leave")
    compare_next = False
    while True:
        try:
            line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
        except (EOFError, click.exceptions.Abort):
            break
        if not line.strip():
            continue
        try:
            if line.lstrip().startswith("/"):
                result = run_command(session, line)
                if result.quit:
                    break
                compare_next = compare_next or result.compare_next
                ui_chat.chat_note(result.message)
                continue
            if compare_next:
                compare_next = False
                base, tuned = session.compare(line, pending, pending_audio)
                ui_chat.show_compare(line, _readable(session, base), _readable(session, tuned))
            else:
                ui_chat.stream_reply(_reply_parts(session.reply(line, pending, pending_audio)), label="model",
                                fold_thought=True)
            while session.pending_calls:  # the (tuned) model called tools: their results, then it goes on
                name = session.pending_calls[0]["function"]["name"]
                session.add_tool_result(click.prompt(f"result of {name}", prompt_suffix="> ", default="",
                                                     show_default=False))
                if not session.pending_calls:
                    ui_chat.stream_reply(_reply_parts(session.resume()), label="model", fold_thought=True)
            pending, pending_audio = [], []
            ui_chat.chat_footer(session.stats)
        except UserError as exc:  # a bad command or value: say so, keep chatting
            ui_chat.chat_error(exc.one_line())


@click.command()
@click.argument("model_or_run")
@click.option("--prompt", default=None, help="The prompt.")
@click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False),
              help="A file of prompts: one per line, or JSONL with prompt / messages rows.")
@click.option("--compare", is_flag=True, help="Answer with the base model and the tuned model, side by side.")
@click.option("--json", "as_json", is_flag=True, help="Print the answers as JSON.")
@sampling_options
def generate(model_or_run, prompt, prompts_file, compare, as_json, adapter, system, thinking, tools_file, temp, top_k,
             top_p, min_p, max_tokens, seed, images, audio):
    """Answer one prompt (or a file of prompts) with MODEL_OR_RUN, optionally base vs tuned.

    With --tools, a tool call the model makes is shown (and in --json, its own field); it is not run.
    """
    from mlx_gemma_tune import ui
    from mlx_gemma_tune.generate import generate_answers, read_prompts
    from mlx_gemma_tune.ui import chat as ui_chat

    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give exactly one of --prompt TEXT or --prompts FILE")
    prompts = [prompt] if prompt is not None else read_prompts(prompts_file)
    with ui.status("Loading the model" + (" and its towers" if images or audio else "")):
        session = _open_session(model_or_run, adapter, system, thinking, tools_file, temp, top_k, top_p, min_p,
                                max_tokens, seed, images, audio)
    images, audio = list(images) or None, list(audio) or None
    if compare and session.adapter is None:
        raise UserError("--compare needs an adapter", hint="pass --adapter DIR or a run directory")
    if not as_json and not compare and len(prompts) == 1:
        ui_chat.stream_reply(_reply_parts(session.reply(prompts[0], images, audio)))
        ui_chat.chat_footer(session.stats)
        return
    answers = generate_answers(session, prompts, compare, images, audio)
    if as_json:
        ui.print_json([a.__dict__ for a in answers])
        return
    for a in answers:
        if compare:
            ui_chat.show_compare(a.prompt, ui_chat.with_calls(a.base, a.base_tool_calls), ui_chat.with_calls(a.answer, a.tool_calls))
        else:
            thought = f"thinking: {a.thinking}\n" if a.thinking else ""
            ui.out.print(f"prompt: {a.prompt}\n{thought}answer: {ui_chat.with_calls(a.answer, a.tool_calls)}",
                         soft_wrap=True, markup=False)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Where to write the fused MLX model.")
@click.option("--dequantize", "mode", flag_value="dequantize", default=True,
              help="Write the full-precision merge (the default; a quantized base is dequantized).")
@click.option("--requantize", "mode", type=click.Choice(["4", "8"]),
              help="Re-quantize the merge to 4 or 8 bits and report how far it moved from the full-precision merge.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--base", default=None, type=click.Path(file_okay=False),
              help="The original Hugging Face checkpoint, if it moved since convert.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new model is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def fuse(run_dir, out, mode, group_size, base, force, as_json):
    """Merge a run's adapter into its base model, in full precision, as an MLX model."""
    from mlx_gemma_tune import ui
    from mlx_gemma_tune.merge import fuse as run

    requantize = int(mode) if mode in ("4", "8") else None
    with ui.status("Fusing") as progress:
        result = run(run_dir, out, requantize=requantize, group_size=int(group_size), force=force, base=base,
                     progress=progress)
    if as_json:
        ui.print_json(result.to_dict())
    else:
        ui.show_fuse(result)


GGUF_OUTTYPES = ("f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k_m", "q5_k_m", "q6_k")  # gguf_export.OUTTYPES


@click.command()
@click.argument("run_or_fused", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["hf", "peft", "gguf", "gguf-lora"]), required=True,
              help="hf: a transformers checkpoint of the original class; peft: a PEFT LoRA/DoRA adapter; "
                   "gguf: one file for llama.cpp / Ollama / LM Studio (Gemma 3, 3n, 4; text model); "
                   "gguf-lora: the run's adapter as a llama.cpp LoRA adapter (--lora, Ollama's ADAPTER).")
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="A directory (hf, peft) or a .gguf file (gguf, gguf-lora).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="hf: dtype of the exported weights (default: the source checkpoint's).")
@click.option("--outtype", type=click.Choice(GGUF_OUTTYPES), default=None,
              help="gguf (and the base GGUF of gguf-lora --ollama): type of the weight matrices; q4_0, q5_0 and "
                   "the K-quants are made by llama.cpp's quantizer (the [llama-cpp] extra)  [default: f16]")
@click.option("--ollama", is_flag=True, help="gguf: also write an Ollama Modelfile next to the file; gguf-lora: "
                                             "also the base model's GGUF and a Modelfile with FROM + ADAPTER.")
@click.option("--verify", is_flag=True, help="hf: load the export with transformers and compare logits with MLX; "
                                             "gguf: perplexity by llama.cpp of the file and the f16 file, and MLX's.")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="gguf --verify: a dataset file to score instead of the built-in English sample.")
@click.option("--base", default=None, type=click.Path(file_okay=False),
              help="The original Hugging Face checkpoint, if it moved since convert.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export(run_or_fused, fmt, out, dtype, outtype, ollama, verify, calibration, base, force, as_json):
    """Export a run (or a fused model): a Hugging Face checkpoint, a PEFT adapter, a GGUF file or GGUF adapter."""
    from mlx_gemma_tune import export as ex
    from mlx_gemma_tune import ui

    if (outtype or ollama) and fmt not in ("gguf", "gguf-lora"):
        raise click.UsageError("--outtype and --ollama apply to --format gguf and gguf-lora")
    if outtype and fmt == "gguf-lora" and not ollama:
        raise click.UsageError("--outtype with --format gguf-lora is the type of the base GGUF that --ollama writes")
    if dtype and fmt != "hf":
        raise click.UsageError("--dtype applies to --format hf")
    if verify and fmt not in ("hf", "gguf"):
        raise click.UsageError("--verify applies to --format hf and gguf")
    if calibration and not (verify and fmt == "gguf"):
        raise click.UsageError("--calibration applies to --format gguf --verify")
    with ui.status("Exporting") as progress:
        if fmt == "hf":
            result = ex.export_hf(run_or_fused, out, dtype=dtype, base=base, verify=verify, force=force,
                                  progress=progress)
        elif fmt == "gguf":
            from mlx_gemma_tune.gguf_export import export_gguf

            result = export_gguf(run_or_fused, out, outtype=outtype or "f16", base=base, ollama=ollama,
                                 verify=verify, calibration=calibration, force=force, progress=progress)
        elif fmt == "gguf-lora":
            from mlx_gemma_tune.gguf_lora import export_gguf_lora

            result = export_gguf_lora(run_or_fused, out, base=base, ollama=ollama, outtype=outtype or "f16",
                                      force=force, progress=progress)
        else:
            from mlx_gemma_tune.peft_export import export_peft

            result = export_peft(run_or_fused, out, base=base, force=force)
    if as_json:
        ui.print_json(result.to_dict())
    else:
        ui.show_export(result)
    if getattr(result, "verify_passed", None) is False:
        raise UserError(f"--verify: FAIL, transformers' logits differ from MLX's by {result.verified_max_diff:.2e}, "
                        f"more than float32 rounding explains ({result.verify_threshold:.2e})", where=result.output,
                        hint="the export is written but does not compute what the run does: please report this")


@click.command()
@click.argument("model_or_run")
@click.argument("runs", nargs=-1)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (127.0.0.1: this Mac only).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--thinking/--no-thinking", default=False, show_default=True,
              help="Gemma 4: thinking on in the chat template; the thought comes back as reasoning_content.")
def serve(model_or_run, runs, host, port, thinking):
    """Serve MODEL_OR_RUN and more RUNs on its base through an OpenAI-compatible API.

    \b
    /v1/models, /v1/chat/completions (stream), /v1/completions; `model` in a request picks the base
    or a run (by directory name); the page at / streams two models side by side.
    """
    from mlx_gemma_tune import ui
    from mlx_gemma_tune.serve import make_app, open_engine

    with ui.status("Loading the model"):
        engine = open_engine(model_or_run, list(runs), thinking=thinking)
    ui.note(f"Serving {', '.join(engine.models)} on http://{host}:{port}/v1 (the side-by-side page: "
                       f"http://{host}:{port}/); Ctrl-C stops")
    import uvicorn

    uvicorn.run(make_app(engine), host=host, port=port, log_level="warning")


COMMANDS = (chat, generate, fuse, export, serve)
