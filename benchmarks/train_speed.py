"""Training speed and peak memory: plain mlx-lm's trainer vs ours, same model, data and adapter, one process.

    python benchmarks/train_speed.py [--model DIR] [--configs seq512,seq2048,short] [--steps N] [--repeats R]
                                     [--ckpt-layers K]

Model: the bundled Gemma 3 270M (real 262,144-token vocabulary) in float32 unless --model is given.
Both trainers get the same chat rows, batch size, sequence length, LoRA adapter (ours, rank 16 on
every attention and MLP projection of every layer, no dropout), AdamW at the same learning rate:

  mlx-lm       mlx_lm.tuner.trainer.train with default_loss and iterate_batches (compiled step,
               length-sorted batches, logits over every position), ChatDataset with mask_prompt,
               on the model as mlx_lm.utils.load builds it (mlx-lm's own attention and MLP)
  ours         trainer.run with the defaults: chunked loss over target tokens, blocked attention,
               compiled step, train.grad_checkpoint auto (no checkpointing where the machine's budget
               allows it); `ckpt K` checkpoints K layers (selective recomputation), `ckpt all` every
               layer; on the short-row data `packed` packs rows into 512-token sequences

Useful tokens are target tokens (unpadded, unmasked: the assistant answers). The first step of every
run compiles and is left out; a run's step time is the median of the others (--steps - 1 >= 3) and its
useful tokens/s are its mean target tokens per step over that median. Every configuration runs
--repeats times in one invocation, interleaved (mlx-lm, ours, ..., then again), and each ratio is taken
between runs of the same round; the table gives the median over rounds and the spread (lowest-highest).
The memory column is MLX's peak of the whole run; the estimate column is memory.py's prediction.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_gemma_tune.train_state import TrainCallback

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone cloud market garden "
         "silver window orange planet summer winter engine letter number yellow").split()
LR = 1e-4
RANK = 16

CONFIGS = {
    # name: (rows, batch, max_seq_length, prompt words, answer words, pack)
    "seq512": (24, 4, 512, (190, 210), (150, 170), False),
    "seq2048": (8, 1, 2048, (925, 940), (665, 680), False),
    "short": (256, 8, 512, (20, 60), (6, 20), True),
}


def make_rows(n: int, prompt_words: tuple[int, int], answer_words: tuple[int, int], seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)

    def text(lo_hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*lo_hi)))

    return [{"messages": [{"role": "user", "content": "Repeat after me: " + text(prompt_words)},
                          {"role": "assistant", "content": text(answer_words)}]} for _ in range(n)]


class _Timings:
    """Collects per-step (seconds, useful tokens) from either trainer's reports (one step each)."""

    def __init__(self):
        self.steps: list[tuple[float, int]] = []

    # mlx-lm's TrainingCallback
    def on_train_loss_report(self, info):
        self.steps.append((1.0 / info["iterations_per_second"], round(info["tokens_per_second"]
                                                                     / info["iterations_per_second"])))

    def on_val_loss_report(self, info):
        pass

    # ours (trainer.TrainCallback: reports are train_state.TrainReport objects)
    def on_train_report(self, report):
        self.steps.append((1.0 / report.it_per_sec, round(report.tokens_per_sec / report.it_per_sec)))

    def on_val_report(self, report):
        pass

    def summary(self) -> dict:
        timed = self.steps[1:] or self.steps  # the first step compiles
        secs = statistics.median(s for s, _ in timed)
        return {"step_s": secs, "useful_tok_s": statistics.mean(t for _, t in timed) / secs,
                "step_times": [round(s, 3) for s, _ in timed]}


def _fresh_model(path: Path, stock: bool = False):
    """(model, tokenizer) with our LoRA adapter; stock: loaded by mlx-lm itself (none of our fixes or fast
    paths: plain mlx-lm's model code)."""
    import mlx.core as mx

    from mlx_gemma_tune import lora, models

    if stock:
        from mlx_lm.utils import load

        model, tokenizer, config = load(str(path), return_config=True)
    else:
        model, tokenizer, config = models.load(path)
    mx.random.seed(0)
    lora.apply(model, config, lora.LoraSettings(rank=RANK, alpha=2 * RANK, dropout=0.0))
    return model, tokenizer


def run_mlx_lm(path: Path, rows: list[dict], batch: int, seq: int, steps: int, work: Path) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs, default_loss, iterate_batches, train

    with _stock_attention():
        model, tokenizer = _fresh_model(path, stock=True)
        data = CacheDataset(ChatDataset(rows, tokenizer, chat_key="messages", mask_prompt=True))
        timings = _Timings()
        mx.clear_cache()
        mx.reset_peak_memory()
        args = TrainingArgs(batch_size=batch, iters=steps, steps_per_report=1, steps_per_eval=10**9,
                            steps_per_save=10**9, max_seq_length=seq, adapter_file=str(work / "mlx_lm.safetensors"))
        train(model, optim.AdamW(learning_rate=LR), data, None, args, default_loss, iterate_batches, timings)
    return timings.summary() | {"peak_gib": mx.get_peak_memory() / 2**30}


@contextlib.contextmanager
def _stock_attention():
    """mlx-lm's own mask and attention functions in its Gemma 3 module while plain mlx-lm trains (our
    attention.install points them at blocked attention once our trainer has loaded a model)."""
    from mlx_lm.models import base, gemma3_text

    saved = gemma3_text.create_attention_mask, gemma3_text.scaled_dot_product_attention
    gemma3_text.create_attention_mask = base.create_attention_mask
    gemma3_text.scaled_dot_product_attention = base.scaled_dot_product_attention
    try:
        yield
    finally:
        gemma3_text.create_attention_mask, gemma3_text.scaled_dot_product_attention = saved


def _prepare(path: Path, data_file: Path, batch: int, seq: int, steps: int, work: Path, pack: bool, ckpt,
             name: str):
    from mlx_gemma_tune import prepare

    sets = (f"train.iters={steps}", f"train.batch_size={batch}", "train.report_every=1", "train.eval_every=100000",
            "train.save_every=100000", f"train.lr={LR}", "train.warmup_ratio=0", "train.schedule=constant",
            "train.weight_decay=0", "data.valid_fraction=0", f"data.max_seq_length={seq}", f"data.pack={pack}",
            f"train.grad_checkpoint={str(ckpt).lower()}", f"lora.rank={RANK}", f"lora.alpha={2 * RANK}",
            "lora.dropout=0", "train.max_grad_norm=null")
    return prepare.prepare_run(model=str(path), data=str(data_file), out=str(work / name), sets=sets, force=True)


def estimate_ours(path: Path, data_file: Path, batch: int, seq: int, work: Path, *, pack: bool, ckpt: bool):
    from mlx_gemma_tune import memory, packing

    prepared = _prepare(path, data_file, batch, seq, 1, work, pack, ckpt, "estimate")
    bins = packing.pack([len(e.tokens) for e in prepared.train], seq) if pack else None
    return memory.estimate_for_run(prepared, bins, grad_checkpoint=ckpt)


class _OursTimings(_Timings, TrainCallback):
    def on_start(self, start):
        self.start = start


def run_ours(path: Path, data_file: Path, batch: int, seq: int, steps: int, work: Path, *, pack: bool,
             ckpt, name: str) -> dict:
    """ckpt: train.grad_checkpoint (auto, true, false or a number of layers)."""
    import mlx.core as mx

    from mlx_gemma_tune import trainer

    prepared = _prepare(path, data_file, batch, seq, steps, work, pack, ckpt, name)
    timings = _OursTimings()
    mx.clear_cache()
    mx.reset_peak_memory()
    trainer.run(prepared, callback=timings)
    return timings.summary() | {"peak_gib": mx.get_peak_memory() / 2**30,
                                "estimate_gib": timings.start.memory_estimate_gb,
                                "checkpointed": f"{timings.start.checkpointed_layers}/{timings.start.layers}"}


def _spread(values: list[float], fmt: str) -> str:
    mid = statistics.median(values)
    return format(mid, fmt) if len(values) < 2 else f"{mid:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--configs", default="seq512,seq2048,short")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of every configuration in this invocation")
    ap.add_argument("--ckpt-layers", default="8", help="comma-separated layer counts for `ours ckpt K` runs "
                    "(unpacked data); 'all' = every layer; '' = none")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--estimate-only", action="store_true",
                    help="print memory.py's estimate for each of our runs and exit (no training)")
    args = ap.parse_args()

    import mlx.core as mx

    from mlx_gemma_tune import demo

    path = Path(args.model) if args.model else demo.mlx_model()
    ckpts = [c for c in args.ckpt_layers.split(",") if c]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.configs.split(","):
            n, batch, seq, pw, aw, pack = CONFIGS[name]
            rows = make_rows(n, pw, aw, seed=1)
            data_file = work / f"{name}.jsonl"
            data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
            if args.estimate_only:
                for pk, ck in [(pack, False)] + [(False, True if c == "all" else int(c)) for c in ckpts]:
                    est = estimate_ours(path, data_file, batch, seq, work, pack=pk, ckpt=ck)
                    print(f"{name} pack={pk} grad_checkpoint={ck}: {est.total_gb:.2f} GiB "
                          f"(weights {est.weights_gb:.2f}, activations {est.activations_gb:.2f}, loss {est.loss_gb:.2f})")
                continue
            ours = functools.partial(run_ours, path, data_file, batch, seq, args.steps, work)
            runs = [("mlx-lm", functools.partial(run_mlx_lm, path, rows, batch, seq, args.steps, work))]
            runs.append(("ours", functools.partial(ours, pack=False, ckpt="auto", name=f"{name}-ours")))
            if pack:
                runs.append(("ours packed", functools.partial(ours, pack=True, ckpt="auto", name=f"{name}-packed")))
            else:
                for c in ckpts:
                    runs.append((f"ours ckpt {c}", functools.partial(
                        ours, pack=False, ckpt=True if c == "all" else int(c), name=f"{name}-ckpt{c}")))
            for rnd in range(args.repeats):
                base = None
                for label, fn in runs:
                    t0 = time.perf_counter()
                    r = fn() | {"config": name, "trainer": label, "batch": batch, "seq": seq, "pack": pack,
                                "round": rnd, "wall_s": time.perf_counter() - t0}
                    base = base or r
                    r["speed_ratio"] = r["useful_tok_s"] / base["useful_tok_s"]
                    r["memory_ratio"] = r["peak_gib"] / base["peak_gib"]
                    results.append(r)
                    print(json.dumps(r), flush=True)

    print(f"\n{path.name}, float32, {mx.default_device()}, {platform.machine()} {platform.system()}, "
          f"mlx {mx.__version__}, mlx-lm {_version('mlx-lm')}; {args.steps} steps per run (first not timed), "
          f"{args.repeats} rounds: median (lowest-highest) over rounds\n")
    print("| data | trainer | batch x seq | step | useful tok/s | peak memory | estimate | speed vs mlx-lm "
          "| memory vs mlx-lm |")
    print("|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["config"], r["trainer"]), []).append(r)
    for (config, trainer_name), rs in groups.items():
        first = rs[0]
        est = "-"
        if first.get("estimate_gib"):
            est = f"{first['estimate_gib']:.2f} GiB ({first['estimate_gib'] / statistics.median(r['peak_gib'] for r in rs) - 1:+.0%})"
        label = trainer_name + (f" ({first['checkpointed']} ckpt)" if first.get("checkpointed") else "")
        print(f"| {config} | {label} | {first['batch']} x {first['seq']} | "
              f"{_spread([r['step_s'] for r in rs], '.2f')} s | {_spread([r['useful_tok_s'] for r in rs], '.1f')} | "
              f"{_spread([r['peak_gib'] for r in rs], '.2f')} GiB | {est} | "
              f"{_spread([r['speed_ratio'] for r in rs], '.2f')}x | {_spread([r['memory_ratio'] for r in rs], '.2f')}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
