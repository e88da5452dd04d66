"""`train`: recipes, every data format, run directory, exact resume, early stopping, bad input."""

from __future__ import annotations

import json
import math

import pytest

from helpers import REPEATED_RTOL, adapter_values, assert_one_line_error, assert_same_training, run_cli, snapshot
from mlx_gemma_tune.train_state import TrainCallback

QA = [("Capital of France?", "Paris."), ("Two plus two?", "Four."), ("Colour of the sky?", "Blue."),
      ("Opposite of hot?", "Cold."), ("First letter?", "A."), ("Largest ocean?", "Pacific."),
      ("Frozen water?", "Ice."), ("Baby cat?", "Kitten.")]
FAST = ["--set", "train.lr=1e-3", "--set", "lora.rank=4", "--set", "lora.dropout=0.0",
        "--set", "train.batch_size=4", "--set", "train.report_every=1"]


def chat_rows(pairs=QA, system=None):
    rows = []
    for q, a in pairs:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": msgs})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["type"] == "train"]


def test_train_writes_a_complete_run_dir(hf_model, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    run = tmp_path / "run"
    res = run_cli(["train", "--model", hf_model("gemma4_edge"), "--data", data, "-o", run, *FAST,
                   "--set", "train.iters=12", "--set", "train.eval_every=4", "--set", "train.save_every=4",
                   "--set", "data.valid_fraction=0.25"])
    assert res.exit_code == 0, res.output
    for name in ("recipe.yaml", "adapters.safetensors", "adapter_config.json", "metrics.jsonl", "loss.png",
                 "summary.json"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000004", "step-00000008", "step-00000012"]
    # Non-TTY dashboard: one plain line per report with step, loss and tok/s.
    lines = [line for line in res.stdout.splitlines() if line.startswith("step ") and "loss" in line
             and "tok/s" in line]
    assert [int(line.split()[1].split("/")[0]) for line in lines] == list(range(1, 13))
    assert any("val_loss" in line for line in res.stdout.splitlines())
    recs = train_records(run)
    assert len(recs) == 12 and recs[-1]["loss"] < recs[0]["loss"]
    from PIL import Image

    assert Image.open(run / "loss.png").size == (640, 400)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["best_step"] in (4, 8, 12)
    # The recipe written is the resolved one: it reproduces the run.
    import yaml

    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["train"]["lr"] == 1e-3 and saved["lora"]["rank"] == 4 and saved["data"]["path"] == str(data)


def test_mlx_lm_loads_the_run_adapter(hf_model, tmp_path):
    import mlx.core as mx
    from mlx_lm import generate, load

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    run = tmp_path / "run"
    res = run_cli(["train", "--model", hf_model("gemma3_text"), "--data", data, "-o", run, *FAST,
                   "--set", "train.iters=6"])
    assert res.exit_code == 0, res.output
    model, tok = load(str(hf_model("gemma3_text")), adapter_path=str(run))
    text = generate(model, tok, prompt="Capital of France?", max_tokens=4)
    assert isinstance(text, str)
    base, _ = load(str(hf_model("gemma3_text")))
    x = mx.array([[2, 40, 41, 42]])
    assert float(mx.abs(model(x) - base(x)).max()) > 1e-4  # the adapter is really applied


def _dataset(kind: str, container: str, tmp_path):
    """The QA pairs in one of the row formats, written in one of the containers."""
    if kind == "chat":
        rows = chat_rows()
    elif kind == "prompt_completion":
        rows = [{"prompt": q, "completion": a} for q, a in QA]
    elif kind == "dolly":
        rows = [{"instruction": q, "context": "Answer briefly." if i % 2 else "", "response": a,
                 "category": "qa"} for i, (q, a) in enumerate(QA)]
    else:
        rows = [{"text": f"Question: {q} Answer: {a}"} for q, a in QA]
    if container == "jsonl":
        return write_jsonl(tmp_path / "data.jsonl", rows)
    if container == "csv":
        import csv

        path = tmp_path / "data.csv"
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return path
    if container == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    import datasets

    path = tmp_path / "hfds"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind,container", [
    ("chat", "jsonl"), ("prompt_completion", "jsonl"), ("dolly", "jsonl"), ("text", "jsonl"),
    ("dolly", "csv"), ("prompt_completion", "parquet"), ("chat", "save_to_disk"), ("text", "csv"),
])
def test_every_format_trains(kind, container, hf_model, tmp_path):
    data = _dataset(kind, container, tmp_path)
    run = tmp_path / "run"
    res = run_cli(["train", "--model", hf_model("gemma3n"), "--data", data, "-o", run, *FAST,
                   "--set", "train.iters=15", "--set", "data.valid_fraction=0"])
    assert res.exit_code == 0, res.output
    recs = train_records(run)
    assert len(recs) == 15 and all(math.isfinite(r["loss"]) for r in recs)
    assert recs[-1]["loss"] < 0.7 * recs[0]["loss"], (recs[0]["loss"], recs[-1]["loss"])
    assert (run / "adapters.safetensors").is_file()


class StopAt(TrainCallback):
    """A callback that asks the trainer to stop after a given step (as Ctrl-C does)."""

    def __init__(self, control, step):
        self.control, self.step = control, step

    def on_train_report(self, report):
        if report.step == self.step:
            self.control.request_stop()


@pytest.mark.parametrize("extra", [(), ("data.pack=true", "data.max_seq_length=128", "train.grad_checkpoint=true")],
                         ids=["plain", "packed-checkpointed"])
def test_resume_is_exact(extra, hf_model, tmp_path):
    from mlx_gemma_tune import prepare, trainer

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    sets = ("train.lr=1e-3", "lora.rank=4", "lora.dropout=0.1", "train.batch_size=2", "train.grad_accumulation=2",
            "train.report_every=1", "train.iters=10", "train.save_every=3", "train.eval_every=5",
            "data.valid_fraction=0.25", *extra)
    prepared = prepare.prepare_run(model=str(hf_model("gemma4_moe")), data=str(data), out=str(tmp_path / "a"),
                                   sets=sets)
    init = adapter_values(prepared.model)
    full = trainer.run(prepared)
    assert full.steps == 10 and not full.interrupted

    control = trainer.Control()
    first = trainer.run(prepare.prepare_run(model=str(hf_model("gemma4_moe")), data=str(data),
                                            out=str(tmp_path / "b"), sets=sets),
                        callback=StopAt(control, 4), control=control)
    assert first.interrupted and first.steps == 4
    assert (tmp_path / "b" / "checkpoints" / "step-00000004" / "state.json").is_file()
    res = run_cli(["train", "--resume", tmp_path / "b"])
    assert res.exit_code == 0, res.output
    assert "estimated peak memory" in res.output
    if extra:
        assert "packed sequences" in res.output and "gradient checkpointing all 4 layers" in res.output
    assert [r["step"] for r in train_records(tmp_path / "b")] == list(range(1, 11))
    assert_same_training(tmp_path / "b", tmp_path / "a", init, REPEATED_RTOL)


def test_interrupted_cli_run_prints_resume_command(hf_model, tmp_path, monkeypatch):
    from mlx_gemma_tune import trainer

    real_run = trainer.run

    def run_with_stop(prepared, callback=None, control=None):  # as if Ctrl-C arrived during step 2
        control = trainer.Control()
        return real_run(prepared, callback=_Both(callback, StopAt(control, 2)), control=control)

    monkeypatch.setattr(trainer, "run", run_with_stop)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    res = run_cli(["train", "--model", hf_model("gemma3_text"), "--data", data, "-o", tmp_path / "r", *FAST,
                   "--set", "train.iters=8"])
    assert res.exit_code == 130
    assert f"mlx-gemma-tune train --resume {tmp_path / 'r'}" in res.stderr
    assert (tmp_path / "r" / "checkpoints" / "step-00000002").is_dir()


class _Both(TrainCallback):
    """Every callback of cbs hears every call."""

    def __init__(self, *cbs):
        self.cbs = [c for c in cbs if c is not None]
        for name in ("on_start", "on_train_report", "on_val_report", "on_checkpoint", "on_early_stop", "on_end"):
            setattr(self, name, lambda *a, _name=name: [getattr(c, _name)(*a) for c in self.cbs])


def test_early_stopping_keeps_the_best_adapter(hf_model, tmp_path):
    # Validation answers contradict the training answers: the longer it trains, the worse it validates.
    split = tmp_path / "split"
    split.mkdir()
    write_jsonl(split / "train.jsonl", chat_rows())
    write_jsonl(split / "valid.jsonl", chat_rows([(q, "Banana.") for q, _ in QA]))
    run = tmp_path / "run"
    res = run_cli(["train", "--model", hf_model("gemma3_text"), "--data", split, "-o", run, *FAST,
                   "--set", "train.iters=40", "--set", "train.eval_every=2", "--set", "train.save_every=100",
                   "--set", "train.early_stopping_patience=2", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    vals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    best = min(vals, key=lambda r: r["val_loss"])
    assert summary["stopped_early"] and summary["steps"] < 40
    assert summary["best_step"] == best["step"] == summary["adapter_from_step"]
    ckpt = run / "checkpoints" / f"step-{best['step']:08d}" / "adapters.safetensors"
    assert (run / "adapters.safetensors").read_bytes() == ckpt.read_bytes()
    assert vals[-1]["val_loss"] > best["val_loss"]


# ---- bad input: one clear line, nothing written ---------------------------------------------


@pytest.mark.parametrize("content,needle", [
    ('{"prompt": "a", "completion": "b"}\n{"messages": [oops]}\n', "data.jsonl:2"),
    ('{"prompt": "a", "completion": "b"}\n{"foo": 1}\n', "data.jsonl:2"),
    ("", "data.jsonl"),
    ('{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}\n', "wizard"),
])
def test_bad_datasets(content, needle, hf_model, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    before = snapshot(tmp_path)
    res = run_cli(["train", "--model", hf_model("gemma3_text"), "--data", data, "-o", tmp_path / "run"])
    assert_one_line_error(res, needle)
    assert snapshot(tmp_path) == before


def test_overlong_row_with_overlong_error(hf_model, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows() + chat_rows([("x " * 300, "y")]))
    before = snapshot(tmp_path)
    res = run_cli(["train", "--model", hf_model("gemma3_text"), "--data", data, "-o", tmp_path / "run",
                   "--set", "data.overlong=error", "--set", "data.max_seq_length=64"])
    assert_one_line_error(res, "data.jsonl:9", "longer than data.max_seq_length 64")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("recipe_text,needles", [
    ("lora:\n  rnak: 8\n", ["unknown key 'lora.rnak'", "did you mean 'lora.rank'?"]),
    ("train:\n  lr: fast\n", ["train.lr: expected a number, got 'fast'"]),
    ("train:\n  lr: -1.0\n", ["train.lr must be positive"]),
    ("lora:\n  rank: 0\n", ["lora.rank must be at least 1"]),
    ("lora:\n  method: qdora\n", ["lora.method: must be one of lora, dora"]),
    ("trian:\n  lr: 1.0\n", ["unknown section 'trian'", "did you mean 'train'?"]),
])
def test_bad_recipes(recipe_text, needles, hf_model, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    before = snapshot(tmp_path)
    res = run_cli(["train", recipe, "--model", hf_model("gemma3_text"), "--data", data, "-o", tmp_path / "run"])
    assert_one_line_error(res, str(recipe), *needles)
    assert snapshot(tmp_path) == before


def test_all_recipe_problems_at_once(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora:\n  rnak: 8\ntrain:\n  lr: fast\n  batchsize: 2\n")
    res = run_cli(["train", recipe])
    line = assert_one_line_error(res, "lora.rnak", "train.lr", "train.batch_size", "model.path is required",
                                 "data.path is required")
    assert line.count(";") >= 4


def test_run_dir_exists(hf_model, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    before = snapshot(tmp_path)
    res = run_cli(["train", "--model", hf_model("gemma3_text"), "--data", data, "-o", run])
    assert_one_line_error(res, str(run), "already exists", "--resume", "--force")
    assert snapshot(tmp_path) == before


def test_set_without_equals_and_unknown_set_key(hf_model, tmp_path):
    assert_one_line_error(run_cli(["train", "--set", "lora.rank"]), "--set expects key=value")
    assert_one_line_error(run_cli(["train", "--set", "lora.rnk=3", "--model", "m", "--data", "d"]),
                          "did you mean 'lora.rank'?")


# ---- recipes ----------------------------------------------------------------------------------


def test_recipes_list_show_copy(tmp_path):
    from mlx_gemma_tune import recipe

    res = run_cli(["recipes", "list"])
    assert res.exit_code == 0
    names = [line.split()[0] for line in res.stdout.splitlines()]
    assert {"gemma4-e2b-lora", "gemma4-e2b-qlora", "gemma3n-e2b-lora", "gemma4-26b-a4b-qlora", "gemma3-270m-lora"} <= \
        set(names)
    assert {f"tasks/{t}" for t in ("extraction", "text-to-sql", "movie-reviews", "support", "dolly",
                                                 "tool-calling")} <= set(names)
    files = sorted(recipe.RECIPES_DIR.rglob("*.yaml"))
    assert len(files) == len(names) >= 16
    from mlx_gemma_tune import dataset_files

    for name in names:  # every shipped recipe file (recursively) is valid; tasks name their dataset
        raw = recipe.read_yaml(recipe.find_recipe(name))
        r = recipe.build(raw, {} if name.startswith("tasks/") else {"data.path": "x.jsonl"}, name)
        assert (r.model.path.startswith("google/") or r.model.path == "demo") and r.lora.alpha == 2 * r.lora.rank
        if name.startswith("tasks/"):
            assert dataset_files.read_splits(r.data.path).keys() == {"train", "valid", "test"}
        text = recipe.find_recipe(name).read_text()
        assert text.startswith("# ") and f"mlx-gemma-tune train {name}" in text and "# Memory: about" in text
        # one home per default: a shipped recipe sets only what differs from the defaults, each with its reason
        defaults = recipe.build({}, {"model.path": "x", "data.path": "x"}).to_dict()
        for section, values in raw.items():
            for key, value in values.items():
                assert value != defaults[section][key], f"{name}: {section}.{key} restates the default"
        values = [line for line in text.splitlines() if line.startswith("  ")]
        assert values and all("  # " in line for line in values), name
    shown = run_cli(["recipes", "show", "gemma4-e2b-qlora"])
    assert shown.exit_code == 0 and "quantize: 4" in shown.stdout
    dest = tmp_path / "mine.yaml"
    assert run_cli(["recipes", "copy", "gemma4-e2b-qlora", dest]).exit_code == 0
    assert dest.read_text() == shown.stdout
    assert_one_line_error(run_cli(["recipes", "copy", "gemma4-e2b-qlora", dest]), "already exists")
    assert_one_line_error(run_cli(["recipes", "show", "gemma4-e2b-lroa"]), "did you mean 'gemma4-e2b-lora'?")


def test_precedence_defaults_recipe_flags(tmp_path):
    from mlx_gemma_tune import errors
    from mlx_gemma_tune.prepare import resolve_recipe

    path = tmp_path / "r.yaml"
    path.write_text("model:\n  path: a\ndata:\n  path: b\nlora:\n  rank: 8\ntrain:\n  lr: 1e-4\n")
    r, name = resolve_recipe(str(path), data="c", sets=("lora.rank=32",))
    assert name == "r" and r.model.path == "a" and r.data.path == "c"
    assert r.lora.rank == 32 and r.train.lr == 1e-4 and r.lora.alpha == 32.0 and r.train.schedule == "cosine"
    assert r.train.epochs == 3 and r.train.batch_size == 4 and r.lora.dropout == 0.05 and r.train.warmup_ratio == 0.1
    # a key typed `str | list` takes a list (lora.targets), and still refuses a number
    r, _ = resolve_recipe(str(path), sets=("lora.targets=[q_proj, v_proj]",))
    assert r.lora.targets == ["q_proj", "v_proj"]
    with pytest.raises(errors.UserError, match="lora.targets: expected a name or a list of names"):
        resolve_recipe(str(path), sets=("lora.targets=3",))


# ---- masks, data check, QLoRA on the fly ------------------------------------------------------


@pytest.mark.parametrize("family", ["gemma3n", "gemma4_edge"])
@pytest.mark.parametrize("system", [None, "You are terse."])
def test_mask_token_by_token(family, system, hf_model):
    """Only assistant tokens (every turn, with their end-of-turn marker) carry loss."""
    from mlx_lm.utils import load_tokenizer

    from mlx_gemma_tune import data

    tok = load_tokenizer(hf_model(family))
    hf = data.hf_tokenizer(tok)
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"}, {"role": "assistant", "content": "Six."}]
    ex = data.encode_chat(tok, msgs)
    eot = "<end_of_turn>" if family == "gemma3n" else "<turn|>"
    # Walk the tokens: decode each masked run; they must be exactly the two answers.
    runs, cur = [], []
    for t, m in zip(ex.tokens, ex.mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(hf.decode(cur))
            cur = []
    if cur:
        runs.append(hf.decode(cur))
    assert runs == [f"Four.{eot}\n", f"Six.{eot}\n"]
    unmasked = hf.decode([t for t, m in zip(ex.tokens, ex.mask) if not m])
    assert "Two plus two?" in unmasked and "And three plus three?" in unmasked
    if system:
        assert system in unmasked
        if family == "gemma3n":  # no system role: folded into the first user turn
            assert f"<start_of_turn>user\n{system}" in unmasked
        else:
            assert f"<|turn>system\n{system}" in unmasked


def test_no_mask_prompt_trains_on_everything(hf_model, tmp_path):
    from mlx_lm.utils import load_tokenizer

    from mlx_gemma_tune import data, dataset_files

    path = write_jsonl(tmp_path / "d.jsonl", chat_rows()[:1])
    row = dataset_files.read_rows(path)[0]
    tok = load_tokenizer(hf_model("gemma3_text"))
    [unmasked], [masked] = data.encode_row(tok, row, mask_prompt=False), data.encode_row(tok, row, mask_prompt=True)
    assert all(unmasked.mask) and not all(masked.mask) and unmasked.tokens == masked.tokens


def test_data_check_cli(hf_model, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows()[:3] + chat_rows()[:1] + [{"prompt": "q", "completion": ""}])
    res = run_cli(["data", "check", path, "--model", hf_model("gemma3n"), "--max-seq-length", "24", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["splits"] == {"train": 5} and rep["formats"] == {"chat": 4, "prompt_completion": 1}
    assert rep["duplicates"] == 1 and rep["duplicates_at"][0].startswith(f"{path}:4")
    assert rep["empty"] == 1 and rep["length_unit"] == "tokens"
    from mlx_lm.utils import load_tokenizer

    from mlx_gemma_tune import data, dataset_files

    tok = load_tokenizer(hf_model("gemma3n"))
    lengths = [max(len(e.tokens) for e in data.encode_row(tok, r)) for r in dataset_files.read_rows(path)]
    assert rep["lengths"]["max"] == max(lengths) and rep["lengths"]["min"] == min(lengths)
    assert rep["too_long"] == sum(n > 24 for n in lengths) > 0
    human = run_cli(["data", "check", path])
    assert human.exit_code == 0 and "Duplicates" in human.stdout and "characters" in human.stdout
    assert_one_line_error(run_cli(["data", "check", tmp_path / "missing.jsonl"]), "missing.jsonl")


def test_qlora_on_the_fly_is_cached(hf_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_GEMMA_TUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    for run in ("r1", "r2"):
        res = run_cli(["train", "--model", hf_model("gemma4_dense"), "--data", data, "-o", tmp_path / run, *FAST,
                       "--quantize", "4", "--set", "train.iters=8", "--set", "data.valid_fraction=0"])
        assert res.exit_code == 0, res.output
        recs = train_records(tmp_path / run)
        assert recs[-1]["loss"] < recs[0]["loss"]
    converted = list((tmp_path / "cache" / "models").iterdir())
    assert len(converted) == 1  # converted once, reused by the second run
    config = json.loads((converted[0] / "config.json").read_text())
    assert config["quantization"]["bits"] == 4


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nan_in_a_run_stops_with_step_and_last_checkpoint(where, hf_model, tmp_path, monkeypatch):
    import mlx.core as mx

    from mlx_gemma_tune import losses

    real = losses.masked_cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # the 5th forward (step 5): a NaN loss, or a finite loss with NaN gradients
        calls["n"] += 1
        total, count = real(*args, **kwargs)
        if calls["n"] != 5:
            return total, count
        if where == "loss":
            return total * mx.array(float("nan")), count
        return total + 0.0 * mx.sqrt(mx.abs(total - mx.stop_gradient(total))), count  # d sqrt(0) = inf, x 0 = NaN

    monkeypatch.setattr(losses, "masked_cross_entropy", poisoned)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    run = tmp_path / "run"
    res = run_cli(["train", "--model", hf_model("gemma3_text"), "--data", data, "-o", run, *FAST,
                   "--set", "train.iters=10", "--set", "train.save_every=2", "--set", "data.valid_fraction=0"])
    what = "loss is nan" if where == "loss" else "gradient norm is nan"
    line = assert_one_line_error(res, "step 5", what, "not updated", str(run / "checkpoints" / "step-00000004"))
    assert "train.lr" in line
    assert (run / "checkpoints" / "step-00000004" / "state.json").is_file()
    assert len(train_records(run)) == 4  # nothing recorded for the poisoned step


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_lr_schedules_drive_adamw(kind):
    """Every schedule, with and without warm-up, gives the optimizer the intended learning rates."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlx_gemma_tune import schedule

    for warmup in (0, 4):
        opt = optim.AdamW(learning_rate=schedule.lr_schedule(1e-2, kind, warmup, 10))
        params = {"w": mx.ones((3,))}
        seen = []
        for _ in range(10):
            opt.update(params, {"w": mx.ones((3,))})
            seen.append(float(opt.learning_rate))
        if warmup:
            assert seen[0] == pytest.approx(1e-2 / warmup) and seen[warmup - 1] == pytest.approx(1e-2)
        if kind == "constant":
            assert seen[warmup:] == pytest.approx([1e-2] * (10 - warmup))
        else:
            assert seen[-1] < seen[warmup]


def test_typed_state_and_reports_keep_the_files_and_the_loss_plugs_in(hf_model, tmp_path):
    """metrics.jsonl and state.json keep their format (old checkpoints load: missing keys take their
    defaults), and an objective passed to trainer.run is the one trained and reported."""
    from mlx_gemma_tune import losses, prepare, trainer
    from mlx_gemma_tune.train_state import TrainState

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    sets = ("train.iters=2", "train.report_every=1", "data.valid_fraction=0.25", "train.eval_every=2", "lora.rank=4")

    def prepared(out):
        return prepare.prepare_run(model=str(hf_model("gemma3_text")), data=str(data), out=str(tmp_path / out),
                                   sets=sets)

    trainer.run(prepared("plain"))
    records = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert list(records[0]) == ["type", "step", "total_steps", "epoch", "loss", "smoothed_loss", "lr",
                                "tokens_per_sec", "it_per_sec", "peak_memory_gb", "grad_norm"]
    assert list(records[-1]) == ["type", "step", "val_loss", "best_val_loss", "best_step", "improved"]
    state = json.loads(next((tmp_path / "plain" / "checkpoints").glob("*/state.json")).read_text())
    assert set(state) == {"step", "best_val_loss", "best_step", "bad_evals", "ema", "metrics_lines", "tokens",
                          "adapter_from_step", "best_reward_accuracy"}
    old = TrainState.from_dict({"step": 7, "ema": 1.5, "unknown_later_key": 1})  # older / newer state.json
    assert (old.step, old.ema, old.tokens, old.adapter_from_step) == (7, 1.5, 0, None)

    calls = []

    def doubled(*args, **kwargs):  # another objective: twice the cross-entropy
        calls.append(1)
        total, count = losses.masked_cross_entropy(*args, **kwargs)
        return 2 * total, count

    trainer.run(prepared("doubled"), loss=doubled)
    first = json.loads((tmp_path / "doubled" / "metrics.jsonl").read_text().splitlines()[0])
    assert calls and first["loss"] == pytest.approx(2 * records[0]["loss"], rel=1e-5)  # step 1: same weights


def test_plain_training_lines_have_an_eta_honest_rates_and_one_best(monkeypatch):
    """Logs (no terminal): the CPU expectation before the first step, an ETA per line, a slow rate shown
    as 0.42 (not 0), and the validation line saying 'new best' or the best so far, once."""
    import io

    from rich.console import Console

    from mlx_gemma_tune.train_state import RunStart, TrainReport, ValReport
    from mlx_gemma_tune.ui import train as ui_train

    log = io.StringIO()
    board = ui_train.TrainDashboard(console=Console(file=log, force_terminal=False, width=200))
    clock = iter([100.0, 160.0])  # on_start, then the line of step 2
    monkeypatch.setattr(ui_train.time, "monotonic", lambda: next(clock))
    board.on_start(RunStart(total_steps=10, start_step=0, steps_per_epoch=5, train_rows=20, valid_rows=4,
                            run_dir="runs/x", trainable_parameters=1000, modules=8, packed_sequences=None,
                            grad_checkpoint=False, memory_estimate_gb=None, memory_budget_gb=None, device="cpu"))
    board.on_train_report(TrainReport(step=2, total_steps=10, epoch=1, loss=1.5, smoothed_loss=1.6, lr=2e-4,
                                      tokens_per_sec=0.42, it_per_sec=0.033, peak_memory_gb=1.0, grad_norm=1.0))
    board.on_val_report(ValReport(step=2, val_loss=1.2, best_val_loss=1.2, best_step=2, improved=True))
    board.on_val_report(ValReport(step=4, val_loss=1.3, best_val_loss=1.2, best_step=2, improved=False))
    lines = log.getvalue().splitlines()
    assert "expect seconds per step" in lines[1]
    assert "tok/s 0.42 it/s 0.033" not in lines[2] and "tok/s 0.42 it/s 0.03" in lines[2]
    assert lines[2].endswith("eta 4m 00s")  # 60 s for 2 steps, 8 to go
    assert lines[3] == "step 2 val_loss 1.2000 (new best)"
    assert lines[4] == "step 4 val_loss 1.3000 (best 1.2000 at step 2)"


def test_a_finished_run_says_so_continues_longer_and_chains_into_a_new_run(hf_model, tmp_path):
    """--resume on a finished run is one line; with a larger train.iters it trains on from its last step
    (recipe.yaml updated); lora.init_from starts a new run from its adapter; a misfit adapter is one line."""
    from mlx_gemma_tune import hf_checkpoint, prepare, trainer

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    run = tmp_path / "run"
    base = ["train", "--model", hf_model("gemma3_text"), "--data", data, *FAST]
    first = run_cli([*base, "-o", run, "--set", "train.iters=4", "--set", "train.report_every=1"])
    assert first.exit_code == 0, first.output
    finished = run_cli(["train", "--resume", run])
    assert_one_line_error(finished, str(run), "has finished: step 4 of 4", "--set train.iters=N (N > 4)",
                          "lora.init_from")
    assert_one_line_error(run_cli(["train", "--resume", run, "--set", "lora.rank=8"]), "lora.rank cannot change")
    longer = run_cli(["train", "--resume", run, "--set", "train.iters=6"])
    assert longer.exit_code == 0, longer.output
    assert [r["step"] for r in train_records(run)] == [1, 2, 3, 4, 5, 6]  # on from step 4, not again from 1
    assert "iters: 6" in (run / "recipe.yaml").read_text() and json.loads((run / "summary.json").read_text())["steps"] == 6
    shorter = run_cli(["train", "--resume", run, "--set", "train.iters=5"])
    assert_one_line_error(shorter, "nothing left to train: 6 steps are done and the recipe asks for 5")
    assert "iters: 6" in (run / "recipe.yaml").read_text()  # a refused continuation changes nothing

    # a new run from the first one's adapter: its first loss is the adapter's, not a fresh one's
    chained = prepare.prepare_run(model=str(hf_model("gemma3_text")), data=str(data), out=str(tmp_path / "next"),
                                  sets=("train.lr=1e-3", "lora.rank=4", "lora.dropout=0.0", f"lora.init_from={run}",
                                        "train.iters=1", "data.valid_fraction=0"))
    from mlx.utils import tree_flatten

    start = dict(tree_flatten(chained.model.trainable_parameters()))
    adapter = hf_checkpoint.load_safetensors(run / "adapters.safetensors")
    assert all(bool((start[k] == adapter[k]).all()) for k in adapter)
    trainer.run(chained)
    misfit = run_cli(["train", "--model", hf_model("gemma3_text"), "--data", data, "-o", tmp_path / "bad",
                      "--set", "lora.rank=8", "--set", f"lora.init_from={run}"])
    assert_one_line_error(misfit, "lora.init_from", "does not fit", "lora.rank")
    assert not (tmp_path / "bad").exists()
