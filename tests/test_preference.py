"""Preference tuning (DPO sigmoid / IPO, ORPO): pair data, exact losses and gradients, training, resume, eval."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers import assert_one_line_error, give_lora_b_values, run_cli

# Gemma 3 (soft-cap free) and Gemma 4 E-model (final soft-cap 30, per-layer inputs) fixtures
FAMILIES = ["gemma3_text", "gemma4_edge"]
PAIRS = [{"prompt": f"Capital of country {i}?", "chosen": "Paris.", "rejected": f"London, {i} times."}
         for i in range(12)]


def _reference_loss(objective, logits, targets, mask, reference):
    """The objective written out over full logits (float64 NumPy): log-softmax, the target tokens'
    log-probabilities summed per row, then the paper's formula; the B chosen rows come first."""
    z = np.asarray(logits, dtype=np.float64)
    logp = z - (z.max(-1, keepdims=True) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)))
    tok = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0] * np.asarray(mask)
    rows, n = tok.sum(1), np.asarray(mask).sum(1)
    b = len(rows) // 2
    log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
    if objective.name == "dpo" and objective.dpo_loss == "sigmoid":
        ref = np.asarray(reference, dtype=np.float64)
        losses = -log_sigmoid(objective.beta * ((rows[:b] - ref[:b]) - (rows[b:] - ref[b:])))
    elif objective.name == "dpo":  # IPO on per-token averages
        ref = np.asarray(reference, dtype=np.float64)
        d = (rows[:b] - ref[:b]) / n[:b] - (rows[b:] - ref[b:]) / n[b:]
        losses = (d - 1 / (2 * objective.beta)) ** 2
    else:  # ORPO
        ac, ar = rows[:b] / n[:b], rows[b:] / n[b:]
        log_odds = (ac - np.log1p(-np.exp(ac))) - (ar - np.log1p(-np.exp(ar)))
        losses = -ac - objective.beta * log_sigmoid(log_odds)
    return losses.sum()


@pytest.mark.parametrize("objective", [("dpo", 0.1, "sigmoid"), ("dpo", 0.5, "ipo"), ("orpo", 0.2, "sigmoid")],
                         ids=["dpo", "ipo", "orpo"])
@pytest.mark.parametrize("family", FAMILIES)
def test_losses_and_gradients_equal_the_full_logits_reference(objective, family, hf_model):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_gemma_tune import data, dataset_files, lora, models, preference

    obj = preference.Objective(*objective)
    model, config = models.load_model(hf_model(family))
    mx.random.seed(0)
    lora.apply(model, config, lora.LoraSettings(rank=4, alpha=8, dropout=0.0))
    give_lora_b_values(model)
    _, tokenizer, _ = models.load(hf_model(family))
    rows = [dataset_files._normalise(PAIRS[i], f"row{i}") for i in range(3)]
    pairs = [data.encode_row(tokenizer, r, pairs=True)[0] for r in rows]
    reference = np.array([[-30.0 - i, -45.0 + 2 * i] for i in range(3)], dtype=np.float32)
    inputs, targets, mask, _, extra = preference.pair_batch(pairs, reference)
    assert inputs.shape[0] == 6 and (np.array(mask).sum(1) > 0).all()

    def ours(chunk):
        def f(m):
            value, _, _ = preference.PreferenceLoss(obj)(m, inputs, targets, mask, chunk=chunk, grad=True,
                                                         extra=extra)
            return value
        value, grads = nn.value_and_grad(model, f)(model)
        return float(value), dict(tree_flatten(grads))

    def plain(m):  # straightforward: full logits, log-softmax, sums per row, the formula, autodiff
        logp = nn.log_softmax(m(inputs).astype(mx.float32), axis=-1)
        rows_ = (mx.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum(1)
        return preference.pair_loss(obj, rows_, mask.sum(1), extra.get("reference"))[0]

    want, g_want = nn.value_and_grad(model, plain)(model)
    want, g_want = float(want), dict(tree_flatten(g_want))
    numpy_ref = _reference_loss(obj, np.array(model(inputs).astype(mx.float32)), np.array(targets), np.array(mask),
                                np.array(extra["reference"]))
    assert abs(want - numpy_ref) < 1e-5 * abs(numpy_ref)  # the MLX formula is the paper's
    scale = max(float(mx.abs(g).max()) for g in g_want.values())
    assert scale > 0
    # chunks of 4 target tokens (the last padded with weight 0) against the full-logits autodiff:
    # the same terms summed in another order, 1e-5 relative
    for chunk in (4, 256):
        value, grads = ours(chunk)
        assert abs(value - want) < 1e-5 * abs(want), chunk
        assert grads.keys() == g_want.keys()
        for k in g_want:
            assert float(mx.abs(grads[k] - g_want[k]).max()) < 1e-5 * scale, (chunk, k)


def _data(tmp_path, rows=PAIRS, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SETS = ["--set", "train.iters=8", "--set", "train.lr=1e-2", "--set", "train.batch_size=2", "--set",
        "train.report_every=2", "--set", "train.eval_every=4", "--set", "data.valid_fraction=0.25", "--set",
        "train.save_every=4", "--set", "lora.dropout=0.0"]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_a_few_steps_raise_the_reward_margin_and_metrics_are_written(objective, hf_model, tmp_path):
    run = tmp_path / "run"
    res = run_cli(["train", "--model", hf_model("gemma3_text"), "--data", _data(tmp_path), "-o", run,
                   "--set", f"train.objective={objective}", *SETS])
    assert res.exit_code == 0, res.output
    assert "reward acc" in res.stdout
    assert ("Scoring 12 pairs with the reference model" in res.stdout) == (objective == "dpo")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    val = [r for r in records if r["type"] == "val"]
    assert len(train) == 4 and len(val) == 2
    assert train[-1]["reward_margin"] > train[0]["reward_margin"] and train[-1]["reward_accuracy"] == 1.0
    assert val[-1]["val_reward_margin"] > 0 and val[-1]["val_reward_accuracy"] == 1.0
    assert train[-1]["loss"] < train[0]["loss"]
    assert (objective == "dpo") == (run / "reference_logps.safetensors").is_file()
    assert (run / "loss.png").is_file()


def test_dpo_resume_is_exact(hf_model, tmp_path):
    """Stopped after step 4 and resumed: the same losses and adapter as a run that never stopped (the
    reference log-probabilities come from the run directory, not from the resumed adapter)."""
    from test_train import StopAt, train_records

    from helpers import REPEATED_RTOL, adapter_values, assert_same_training
    from mlx_gemma_tune import prepare, trainer

    data = _data(tmp_path)
    sets = ("train.objective=dpo", "train.lr=1e-4", "lora.rank=4", "lora.dropout=0.1", "train.batch_size=2",
            "train.report_every=1", "train.iters=8", "train.save_every=3", "train.eval_every=4",
            "data.valid_fraction=0.25")
    model = str(hf_model("gemma3_text"))
    prepared = prepare.prepare_run(model=model, data=str(data), out=str(tmp_path / "a"), sets=sets)
    init = adapter_values(prepared.model)
    assert trainer.run(prepared).steps == 8
    control = trainer.Control()
    first = trainer.run(prepare.prepare_run(model=model, data=str(data), out=str(tmp_path / "b"), sets=sets),
                        callback=StopAt(control, 4), control=control)
    assert first.interrupted and first.steps == 4
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "b", broken)
    (broken / "reference_logps.safetensors").unlink()
    assert_one_line_error(run_cli(["train", "--resume", broken]), "reference_logps.safetensors",
                          "cannot resume without the reference")
    res = run_cli(["train", "--resume", tmp_path / "b"])
    assert res.exit_code == 0, res.output
    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert 0.01 < a[-1]["loss"] < a[0]["loss"]  # still learning: the losses compare at their own scale
    for x, y in zip(a, b):
        for key in ("loss", "reward_margin", "chosen_logp", "rejected_logp"):
            assert y[key] == pytest.approx(x[key], rel=REPEATED_RTOL, abs=1e-6), (x["step"], key)
    assert_same_training(tmp_path / "b", tmp_path / "a", init, REPEATED_RTOL)


def test_preference_rows_are_read_in_every_shape_and_refused_clearly(hf_model, tmp_path):
    from mlx_gemma_tune import data, dataset_files, models

    _, tokenizer, _ = models.load(hf_model("gemma3_text"))
    shapes = [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
        {"system": "Be kind.", "prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
        {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"messages": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."},
                      {"role": "user", "content": "Hi?"}],
         "chosen": {"role": "assistant", "content": "Hello."}, "rejected": {"role": "assistant", "content": "Go away."}},
    ]
    for i, obj in enumerate(shapes):
        row = dataset_files._normalise(obj, f"r{i}")
        pair = data.encode_row(tokenizer, row, pairs=True)[0]
        prompt = tokenizer.apply_chat_template(row.messages[:-1], add_generation_prompt=True)
        for ex, answer in ((pair, "Hello."), (pair.rejected, "Go away.")):
            assert ex.tokens[: len(prompt)] == prompt and not any(ex.mask[: len(prompt)])  # the shared prompt
            assert all(ex.mask[len(prompt):])
            assert tokenizer.decode(ex.tokens[len(prompt):]).startswith(answer)
        # sft on preference rows learns the chosen answer
        assert row.messages[-1]["content"] == "Hello."

    bad = tmp_path / "bad.jsonl"
    cases = [({"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}, "same answer"),
             ({"prompt": "Hi?", "chosen": "  ", "rejected": "No."}, "'chosen' is an empty answer"),
             ({"prompt": "Hi?", "chosen": "Yes."}, "no 'rejected'"),
             ({"chosen": "Yes.", "rejected": "No."}, "no prompt"),
             ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hey"}],
               "chosen": "Yes.", "rejected": "No."}, "must end with a user"),
             ({"prompt": "Hi?", "chosen": [{"role": "user", "content": "x"}], "rejected": "No."}, "one assistant")]
    for obj, needle in cases:
        bad.write_text(json.dumps(obj) + "\n")
        res = run_cli(["train", "--model", hf_model("gemma3_text"), "--data", bad, "-o", tmp_path / "never",
                       "--set", "train.objective=dpo"])
        assert_one_line_error(res, "bad.jsonl:1", needle)
        assert not (tmp_path / "never").exists()
    # a dataset without pairs for dpo
    plain = _data(tmp_path, [{"prompt": "Hi?", "completion": "Hello."}] * 4, "plain.jsonl")
    assert_one_line_error(run_cli(["train", "--model", hf_model("gemma3_text"), "--data", plain, "-o",
                                   tmp_path / "never", "--set", "train.objective=dpo"]),
                          "plain.jsonl:1", "preference pairs")
    assert_one_line_error(run_cli(["train", "--model", hf_model("gemma3_text"), "--data", _data(tmp_path), "-o",
                                   tmp_path / "never", "--set", "train.objective=orpo", "--set", "data.pack=true"]),
                          "train.objective", "data.pack")


def test_data_check_reports_pairs(hf_model, tmp_path):
    rows = PAIRS[:3] + [{"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."},
                        {"prompt": "Long? " * 200, "chosen": "Yes.", "rejected": "No."}]
    res = run_cli(["data", "check", _data(tmp_path, rows), "--model", hf_model("gemma3_text"), "--max-seq-length",
                   "64", "--json"])
    report = json.loads(res.stdout)
    assert report["formats"] == {"preference": 5}
    assert len(report["refused"]) == 1 and "pairs.jsonl:4" in report["refused"][0]
    assert "same answer" in report["refused"][0]
    assert report["too_long"] == 1 and report["too_long_at"][0].endswith("pairs.jsonl:5")


def test_eval_preference_reports_reward_accuracy(hf_model, tmp_path):
    run = tmp_path / "run"
    # the longer answer preferred: a model that never saw these pairs gives it the lower log-probability
    data = _data(tmp_path, [{"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]} for r in PAIRS])
    assert run_cli(["train", "--model", hf_model("gemma3_text"), "--data", data, "-o", run,
                    "--set", "train.objective=dpo", *SETS]).exit_code == 0
    res = run_cli(["eval", run, "--data", data, "--metric", "preference", "--json"])
    assert res.exit_code == 0, res.output
    tuned = json.loads(res.stdout)
    res = run_cli(["eval", hf_model("gemma3_text"), "--data", data, "--metric", "preference", "--json"])
    base = json.loads(res.stdout)
    t, b = tuned["preference"]["tuned"], base["preference"]["model"]
    assert t["reward_accuracy"] == 1.0 and t["implicit_reward_accuracy"] == 1.0 and t["pairs"] == 12
    assert b["reward_accuracy"] < t["reward_accuracy"] and t["chosen_logp"] > b["chosen_logp"]
    # the run's base, scored beside it, is the base model itself
    assert tuned["preference"]["base"]["chosen_logp"] == pytest.approx(b["chosen_logp"], rel=1e-5)
    res = run_cli(["eval", run, "--data", data, "--metric", "preference"])
    assert "reward accuracy" in res.stdout and "1.000" in res.stdout
    shutil.rmtree(run)


@pytest.mark.parametrize("variant", ["qlora", "dora"])
def test_dpo_trains_qlora_and_dora(variant, hf_model, tmp_path):
    model = hf_model("gemma4_edge")
    sets = []
    if variant == "qlora":
        from mlx_gemma_tune.convert import convert

        convert(str(model), tmp_path / "q4", quantize=4)
        model = tmp_path / "q4"
    else:
        sets = ["--set", "lora.method=dora"]
    run = tmp_path / "run"
    res = run_cli(["train", "--model", model, "--data", _data(tmp_path), "-o", run, "--set", "train.objective=dpo",
                   *SETS, *sets])
    assert res.exit_code == 0, res.output
    train = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert train[-1]["reward_margin"] > train[0]["reward_margin"] and train[-1]["loss"] < train[0]["loss"]


@pytest.mark.parametrize("metric,best,stopped", [("reward_accuracy", 2, 6), ("loss", 8, 8)])
def test_best_adapter_and_early_stopping_follow_the_chosen_metric(metric, best, stopped, hf_model, tmp_path,
                                                                  monkeypatch):
    """Scripted validations (loss falls while reward accuracy falls): the best step and the stop follow
    train.early_stopping_metric."""
    from mlx_gemma_tune import preference

    script = iter([(0.6, 0.75), (0.5, 0.5), (0.4, 0.5), (0.3, 0.25)])

    def scripted(*args, **kwargs):
        loss, acc = next(script)
        return {"loss": loss} | {k: 0.0 for k in preference.STATS} | {"reward_accuracy": acc}

    monkeypatch.setattr(preference, "evaluate_pairs", scripted)
    run = tmp_path / "run"
    res = run_cli(["train", "--model", hf_model("gemma3_text"), "--data", _data(tmp_path), "-o", run,
                   "--set", "train.objective=dpo", "--set", "train.iters=8", "--set", "train.eval_every=2",
                   "--set", "train.early_stopping_patience=2", "--set", f"train.early_stopping_metric={metric}",
                   "--set", "train.lr=1e-4", "--set", "train.batch_size=2"])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_step"] == best and summary["adapter_from_step"] == best
    assert summary["steps"] == stopped


def test_reward_accuracy_needs_a_preference_objective(hf_model, tmp_path):
    assert_one_line_error(run_cli(["train", "--model", hf_model("gemma3_text"), "--data", _data(tmp_path), "-o",
                                   tmp_path / "r", "--set", "train.early_stopping_metric=reward_accuracy"]),
                          "train.early_stopping_metric", "dpo or orpo")
    assert not (tmp_path / "r").exists()


def test_orpo_is_finite_for_a_certain_answer():
    """An answer the model is sure of (average log-probability ~0: infinite odds) gives a finite ORPO loss and
    gradient, and far from 0 the log odds term matches the float64 formula."""
    import math

    import mlx.core as mx

    from mlx_gemma_tune import preference

    obj = preference.Objective("orpo", 0.1)

    def f(lp):
        return preference.pair_loss(obj, lp, mx.array([4.0, 4.0]))[0]

    for chosen in (-1e-9, -0.5, -3.0):
        lp = mx.array([4 * chosen, -8.0])
        value, grad = mx.value_and_grad(f)(lp)
        assert math.isfinite(float(value)) and bool(mx.isfinite(grad).all()), chosen
    ac, ar = -0.75, -2.0  # per-token averages of 4-token answers
    want = -ac + 0.1 * math.log1p(math.exp(-((ac - math.log1p(-math.exp(ac))) - (ar - math.log1p(-math.exp(ar))))))
    assert float(f(mx.array([4 * ac, 4 * ar]))) == pytest.approx(want, rel=1e-5)
