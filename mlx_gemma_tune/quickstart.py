"""The offline quickstart: a real Gemma learns a task on your laptop, before and after shown side by side.

Steps: get the model (the bundled Gemma 3 270M, or any supported id/directory), answer a few
held-out extraction prompts zero-shot, train a LoRA adapter on the bundled extraction task,
answer the same prompts again, report held-out exact-match before and after, then fuse the
adapter and export a Hugging Face checkpoint and a PEFT adapter.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TASK = "extraction"


@dataclass
class QuickstartResult:
    model: str
    run_dir: str
    prompts: list[str]
    before: list[str]
    after: list[str]
    references: list[str]
    accuracy_before: float
    accuracy_after: float
    eval_rows: int
    fused: str | None = None
    hf: str | None = None
    peft: str | None = None
    notes: list[str] = field(default_factory=list)


def exact_json_match(answer: str, reference: str) -> bool:
    """Same JSON value (key order and spacing ignored), or the same text when the reference is not JSON."""
    try:
        return json.loads(reference) == json.loads(answer.strip())
    except (json.JSONDecodeError, ValueError):
        return answer.strip() == reference.strip()


def _held_out(rows: int):
    from mlx_gemma_tune import dataset_files

    test = dataset_files.read_splits(f"example:{TASK}")["test"][:rows]
    return [(r.messages[:-1], r.messages[-1]["content"]) for r in test]


def _answers(session, items, say, when: str) -> list[str]:
    """Greedy answers to the held-out prompts, one progress line each (each takes seconds on a CPU)."""
    out = []
    for i, (messages, _ref) in enumerate(items, 1):
        say(f"Answering held-out prompt {i} of {len(items)} {when} training")
        out.append("".join(session.stream(messages)).strip())
    return out


def run_quickstart(out: str = "quickstart", *, model: str | None = None, steps: int = 60, eval_rows: int = 10,
                   show: int = 3, force: bool = False, progress: Callable[[str], None] | None = None,
                   train_callback=None) -> QuickstartResult:
    from mlx_gemma_tune import convert, export, fsio, merge, peft_export, prepare, trainer
    from mlx_gemma_tune.generate import ChatSession, Sampling

    say = progress or (lambda _m: None)
    out_p = Path(out).expanduser()
    fsio.check_output_dir(out_p, force=force)
    notes = []
    if sys.platform != "darwin":  # said now, before the slow part, and kept in the result
        notes.append("MLX runs on the CPU here (no Metal GPU): expect seconds per training step, not milliseconds")
        say(notes[-1])
    if model is None:
        from mlx_gemma_tune import demo

        say("Preparing the bundled Gemma 3 270M (first run only)")
        base = demo.mlx_model(progress=say)
    else:
        say(f"Preparing {model}")
        base = convert.ensure_base(model, progress=say)
    items = _held_out(max(eval_rows, show))
    say("Loading the model")
    chat = ChatSession.open(str(base), sampling=Sampling(temp=0.0, max_tokens=64))
    before = _answers(chat, items, say, "before")

    if out_p.exists() and force:
        import shutil

        shutil.rmtree(out_p)
    run_dir = out_p / "run"
    sets = (f"train.iters={steps}", "train.lr=2e-4", "train.warmup_ratio=0.1", "train.schedule=cosine",
            "train.batch_size=4", f"train.eval_every={max(steps // 3, 1)}", f"train.report_every={max(steps // 30, 1)}",
            f"train.save_every={steps}", "train.val_batches=2", "data.max_seq_length=256", "lora.rank=16",
            "lora.alpha=32", "lora.dropout=0.05")
    say("Preparing the training run")
    prepared = prepare.prepare_run(model=str(base), data=f"example:{TASK}", out=str(run_dir), sets=sets,
                                   progress=say)
    trainer.run(prepared, callback=train_callback)

    chat.set_adapter(run_dir)
    after = _answers(chat, items, say, "after")
    refs = [ref for _m, ref in items]
    n = len(items[:eval_rows])
    acc_before = sum(exact_json_match(a, r) for a, r in zip(before[:n], refs[:n])) / n
    acc_after = sum(exact_json_match(a, r) for a, r in zip(after[:n], refs[:n])) / n

    say("Fusing the adapter")
    fused = merge.fuse(str(run_dir), str(out_p / "fused"), progress=say)
    say("Exporting a Hugging Face checkpoint")
    hf = export.export_hf(str(run_dir), str(out_p / "hf"), progress=say)
    peft = peft_export.export_peft(str(run_dir), str(out_p / "peft"))
    prompts = [m[-1]["content"] for m, _ in items]
    result = QuickstartResult(str(base), str(run_dir), prompts[:show], before[:show], after[:show], refs[:show],
                              acc_before, acc_after, n, fused.output, hf.output, peft.output, notes)
    fsio.atomic_write_json(out_p / "quickstart.json", result.__dict__)
    return result
