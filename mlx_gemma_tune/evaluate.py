"""Evaluation: held-out loss / perplexity, task metrics on generated answers (base vs tuned), a local judge."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlx_gemma_tune import data, losses, preference


@dataclass
class LossResult:
    loss: float
    perplexity: float
    tokens: int
    rows: int
    truncated: int
    dropped: list[str] = field(default_factory=list)  # rows with no answer token left after truncation
    data: str | None = None  # the file evaluated (a split folder's test split, else its valid split)

    def to_dict(self) -> dict:
        return asdict(self)


EVAL_BATCH_SIZE = 4  # rows per forward pass of eval (loss and generation), the CLI's default too
EVAL_MAX_TOKENS = 256  # longest generated answer for the task metrics, the CLI's default too


def dataset_loss(model, examples: list[data.Example], batch_size: int = 4,
                 on_batch: Callable[[int, int], None] | None = None) -> tuple[float, int]:
    """Mean token cross-entropy (training forward: no cache) and the number of target tokens."""
    import mlx.core as mx

    from mlx_gemma_tune import multimodal

    total, count, done = 0.0, 0, 0
    images = [e for e in examples if e.extra is not None]
    batches = ([multimodal.batch(e) for e in images] if images else
               ((*b, None, None) for b in data.batches(examples, batch_size)))
    for inputs, targets, mask, _, extra in batches:
        s, n = losses.masked_cross_entropy(model, inputs, targets, mask, extra=extra)
        mx.eval(s, n)
        total += float(s)
        count += int(n)
        done += inputs.shape[0]
        if on_batch:
            on_batch(done, len(examples))
    return (total / count if count else float("nan")), count


def evaluate_loss(model_path: Path, data_path: Path, *, adapter: Path | None = None,
                  batch_size: int = EVAL_BATCH_SIZE, max_seq_length: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> LossResult:
    """Mean cross-entropy (nats per target token) and perplexity of a model or run on a dataset, on the
    tokens training would learn (the same chat-template masks); rows are cut at max_seq_length (None:
    the run's data.max_seq_length, else the recipe default) and rows left without a target are
    dropped and named. `data_path` may be a split folder: its test split, else its valid split.
    Raises InputError when no row has a target."""
    from mlx_gemma_tune import dataset_files, lora, models, rundir

    data_path = dataset_files.held_out(data_path)
    base, run_adapter = rundir.resolve_target(str(model_path))  # a run directory brings its adapter
    model, tokenizer, config = models.load(models.resolve_model_dir(base))
    if adapter is not None or run_adapter is not None:
        lora.load(model, config, adapter or run_adapter)
    max_seq_length, reasoning = rundir.data_settings(str(model_path), max_seq_length, tokenizer)
    examples, truncated = data.load_examples(tokenizer, data_path, max_seq_length, reasoning=reasoning)
    examples, dropped = data.with_targets(examples, data_path, max_seq_length)
    loss, tokens = dataset_loss(model, examples, batch_size, progress)
    rows = len({e.source for e in examples})  # a conversation can be one sequence per turn (data.py)
    return LossResult(loss=loss, perplexity=math.exp(loss), tokens=tokens, rows=rows, truncated=truncated,
                      dropped=dropped, data=str(data_path))


# ---- task metrics on generated answers ------------------------------------------------------


@dataclass
class EvalReport:
    data: str
    rows: int
    metrics: list[str]
    scores: dict  # model label ("tuned" or "base" / "model") -> metric -> mean
    classification: dict | None = None  # label -> classification() result
    judge: dict | None = None  # label -> judge.summarize()
    loss: dict | None = None  # label -> {"loss", "perplexity", "tokens"}
    preference: dict | None = None  # label -> preference_scores() on the data's preference pairs
    differ_most: list[dict] | None = None  # with --compare: rows where base and tuned differ most
    output: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _pairs(tokenizer, data_path, max_seq_length: int | None, reasoning: str) -> list:
    """The preference pairs of a dataset (data.encode_pair), fitted to max_seq_length; InputError
    naming the file when it has none."""
    from mlx_gemma_tune import dataset_files
    from mlx_gemma_tune.errors import InputError

    rows = dataset_files.read_rows(data_path)
    pairs = []
    for row in rows:
        if row.rejected is None:
            continue
        pair = data.encode_pair(tokenizer, row, reasoning)
        pair = data.fit_length(pair, max_seq_length, "drop") if max_seq_length else pair
        if pair is not None:
            pairs.append(pair)
    if not pairs:
        raise InputError("has no preference pairs (prompt, chosen, rejected) for --metric preference",
                         where=str(data_path))
    return pairs


def preference_scores(logps, reference=None) -> dict:
    """{"pairs", "reward_accuracy": share of pairs whose chosen answer has the higher summed log-probability,
    "reward_margin": mean difference (nats), "chosen_logp", "rejected_logp": means (nats)} from (N, 2)
    log-probabilities (preference.reference_logps). With the base model's (N, 2) as reference:
    "implicit_reward_accuracy", DPO's reward accuracy (pi - ref of chosen above that of rejected)."""
    import numpy as np

    lp = np.asarray(logps, dtype=np.float64)
    out = {"pairs": len(lp), "reward_accuracy": float((lp[:, 0] > lp[:, 1]).mean()),
           "reward_margin": float((lp[:, 0] - lp[:, 1]).mean()), "chosen_logp": float(lp[:, 0].mean()),
           "rejected_logp": float(lp[:, 1].mean())}
    if reference is not None:
        d = lp - np.asarray(reference, dtype=np.float64)
        out["implicit_reward_accuracy"] = float((d[:, 0] > d[:, 1]).mean())
    return out


def _items(data_path, need_reference: bool):
    """(row, prompt messages, reference) for every row of a dataset."""
    from mlx_gemma_tune import dataset_files
    from mlx_gemma_tune.errors import InputError

    items = []
    for row in dataset_files.read_rows(data_path):
        if row.messages is None or row.messages[-1]["role"] != "assistant":
            if need_reference:
                raise InputError("has no reference answer for the metrics asked (needs a final assistant message, "
                                 "'completion' or 'response')", where=row.where,
                                 hint="use --metric loss, or add reference answers")
            continue
        items.append((row, row.messages[:-1], row.messages[-1]["content"]))
    return items


def generate_batch(session, prompts: list[list[dict]], max_tokens: int, batch_size: int,
                   on_done: Callable[[int], None] | None = None, tools: list[list[dict] | None] | None = None
                   ) -> list[str]:
    """Greedy answers to many conversations (each with its row's tools, if any), batched through
    mlx-lm's batch_generate."""
    from mlx_lm.generate import batch_generate

    from mlx_gemma_tune.families import END_OF_TURN

    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = [session.prompt_tokens(m, tools[start + i] if tools else None)
                 for i, m in enumerate(prompts[start:start + batch_size])]
        texts = batch_generate(session.model, session.tokenizer, chunk, max_tokens=max_tokens).texts
        for t in texts:
            for marker in END_OF_TURN:
                t = t.split(marker)[0]
            out.append(t.strip())
        if on_done:
            on_done(len(out))
    return out


def evaluate(model_or_run: str, data_path: str, *, metrics: tuple[str, ...] = ("loss",), adapter: str | None = None,
             compare: bool = False, judge_model: str | None = None, max_tokens: int = EVAL_MAX_TOKENS,
             batch_size: int = EVAL_BATCH_SIZE, max_seq_length: int | None = None, output: str | None = None,
             progress: Callable[[int, int], None] | None = None) -> EvalReport:
    """Loss and/or task metrics of a model (and, with compare, its base) on a dataset."""
    from mlx_gemma_tune import fsio
    from mlx_gemma_tune import metrics as M
    from mlx_gemma_tune.errors import UserError
    from mlx_gemma_tune.generate import ChatSession, Sampling

    unknown = [m for m in metrics if m not in M.ALL_METRICS]
    if unknown:
        raise UserError(f"unknown metric '{unknown[0]}'", hint="choose from " + ", ".join(M.ALL_METRICS))
    text_metrics = tuple(m for m in metrics if m not in ("loss", "preference"))
    session = ChatSession.open(model_or_run, adapter, sampling=Sampling(temp=0.0, max_tokens=max_tokens))
    if compare and session.adapter is None:
        raise UserError("--compare needs an adapter", hint="pass --adapter DIR or a run directory")
    labels = (["base", "tuned"] if compare else ["tuned" if session.adapter else "model"])
    from mlx_gemma_tune import dataset_files

    data_path = dataset_files.held_out(data_path)  # a split folder: its test split, else its valid split
    items = _items(data_path, need_reference=bool(text_metrics or judge_model))
    report = EvalReport(data=str(data_path), rows=0, metrics=list(metrics), scores={})
    answers: dict[str, list[str]] = {}
    from mlx_gemma_tune import rundir

    max_seq_length, reasoning = rundir.data_settings(model_or_run, max_seq_length, session.tokenizer)
    examples = data.load_examples(session.tokenizer, data_path, max_seq_length,
                                  reasoning=reasoning)[0] if "loss" in metrics else []
    if examples:
        examples = data.with_targets(examples, data_path, max_seq_length)[0]
    pairs = _pairs(session.tokenizer, data_path, max_seq_length, reasoning) if "preference" in metrics else []
    logps = {}
    if pairs and session.adapter is not None and "base" not in labels:  # a run alone: its base too, for rewards
        session.disable_adapter()
        logps["base"] = preference.reference_logps(session.model, pairs, batch_size)
    for label in labels:
        if label == "base":
            session.disable_adapter()
        else:
            session.enable_adapter()
        if pairs:
            logps[label] = preference.reference_logps(session.model, pairs, batch_size)
            report.preference = (report.preference or {}) | {label: preference_scores(logps[label])}
            report.rows = len(pairs)
        if "loss" in metrics:
            loss, tokens = dataset_loss(session.model, examples, batch_size)
            report.loss = (report.loss or {}) | {label: {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}}
            report.rows = len({e.source for e in examples})
        if text_metrics or judge_model:
            total = len(items)
            answers[label] = generate_batch(session, [m for _r, m, _ref in items], max_tokens, batch_size,
                                            (lambda done, total=total: progress(done, total)) if progress else None,
                                            tools=[r.tools for r, _m, _ref in items])
            report.rows = total
    session.enable_adapter()
    if pairs and "base" in logps and session.adapter is not None:  # DPO's implicit reward against the base
        tuned = labels[-1]
        report.preference[tuned] |= preference_scores(logps[tuned], logps["base"])
        report.preference.setdefault("base", preference_scores(logps["base"]))
    rows_out = []
    for label, preds in answers.items():
        refs = [ref for _r, _m, ref in items]
        per_row = [M.row_scores(p, r, text_metrics) for p, r in zip(preds, refs)]
        report.scores[label] = {k: sum(s[k] for s in per_row) / len(per_row) for k in (per_row[0] if per_row else {})}
        if "classification" in text_metrics:
            report.classification = (report.classification or {}) | {label: M.classification(preds, refs)}
        for i, s in enumerate(per_row):
            if len(rows_out) <= i:
                rows_out.append({"where": items[i][0].where, "prompt": items[i][1][-1]["content"], "reference": refs[i]})
            rows_out[i][f"answer_{label}"] = preds[i]
            rows_out[i][f"scores_{label}"] = s
    if judge_model and answers:
        from mlx_gemma_tune import judge as J

        j = J.Judge(judge_model)
        report.judge, verdicts = {}, {}
        for label, preds in answers.items():
            verdicts[label] = []
            for i, (pred, (_r, msgs, ref)) in enumerate(zip(preds, items)):
                verdicts[label].append(j.score(msgs[-1]["content"], ref, pred))
                rows_out[i][f"judge_{label}"] = verdicts[label][-1]
            report.judge[label] = J.summarize(verdicts[label])
        if compare:  # the tuned model's wins over its base, row by row
            report.judge["tuned"]["vs_base"] = J.win_rate(verdicts["tuned"], verdicts["base"])
    if compare and rows_out:
        key = "f1" if "f1" in text_metrics else (text_metrics[0] if text_metrics else None)
        if key and key in rows_out[0]["scores_tuned"]:
            ranked = sorted(rows_out, key=lambda r: -abs(r["scores_tuned"][key] - r["scores_base"][key]))
            report.differ_most = [r for r in ranked[:5] if r["answer_base"] != r["answer_tuned"]]
    if output:
        path = Path(output)
        fsio.atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_out))
        report.output = str(path)
    return report
