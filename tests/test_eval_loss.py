"""`eval --metric loss`: the masked loss equals transformers' on the same tokens and mask."""

from __future__ import annotations

import json
import math

import pytest
from test_lora import CHAT

from fixtures.gemma_fixtures import FAMILIES
from helpers import LOGITS_RTOL, assert_one_line_error, run_cli

TEMPLATE_OF = {"gemma3_text": "gemma3", "gemma3n": "gemma3"} | {f: "gemma4" for f in FAMILIES[2:]}


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in CHAT) + "\n")
    return path


def _transformers_loss(model_dir, examples) -> float:
    import torch
    import torch.nn.functional as F
    from test_exactness import _hf_model

    model = _hf_model(model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.tokens])
            logits = model(ids).logits[0, :-1].float()
            mask = torch.tensor(ex.mask[1:])
            ce = F.cross_entropy(logits, ids[0, 1:], reduction="none")
            total += float(ce[mask].sum())
            count += int(mask.sum())
    return total / count


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_loss_equals_transformers(family, hf_model, chat_file):
    from mlx_lm.utils import load_tokenizer

    from mlx_gemma_tune import data

    res = run_cli(["eval", hf_model(family), "--data", chat_file, "--metric", "loss", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    examples, _ = data.load_examples(load_tokenizer(hf_model(family)), chat_file)
    ref = _transformers_loss(hf_model(family), examples)
    assert got["rows"] == len(CHAT) and got["tokens"] == sum(sum(e.mask[1:]) for e in examples)
    assert got["loss"] == pytest.approx(ref, rel=LOGITS_RTOL)  # a mean of log-softmaxed logits
    assert got["perplexity"] == pytest.approx(math.exp(ref), rel=LOGITS_RTOL * ref)  # d(e^x)/e^x = dx


@pytest.mark.parametrize("family", ["gemma3_text", "gemma4_edge"])
def test_mask_covers_every_assistant_turn(family, hf_model):
    from mlx_lm.utils import load_tokenizer

    from mlx_gemma_tune import data

    tok = load_tokenizer(hf_model(family))
    ex = data.encode_chat(tok, CHAT[1]["messages"])
    trained = tok._tokenizer.decode([t for t, m in zip(ex.tokens, ex.mask) if m])
    eot = "<end_of_turn>" if TEMPLATE_OF[family] == "gemma3" else "<turn|>"
    assert trained == f"Four.{eot}\nSix.{eot}\n"
    # Nothing of the user turns or the role markers is trained on.
    assert "plus" not in trained and "model" not in trained


def test_eval_human_output(hf_model, chat_file):
    res = run_cli(["eval", hf_model("gemma3_text"), "--data", chat_file])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("loss ") and "perplexity" in res.stdout and "4 rows" in res.stdout


@pytest.mark.parametrize("content,needle", [
    ('{"prompt": "hi", "completion": "hello"}\n{"messages": oops}\n', ":2: is not valid JSON"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}\n', ":1: message 0 has unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: has no assistant message"),
    ('{"foo": "hello"}\n', ":1: row has neither a known schema"),
    ("\n\n", "has no rows"),
])
def test_bad_dataset_is_one_line(content, needle, hf_model, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert_one_line_error(run_cli(["eval", hf_model("gemma3_text"), "--data", path]), str(path), needle)


def test_bad_model_path(tmp_path, chat_file):
    assert_one_line_error(run_cli(["eval", tmp_path / "nope", "--data", chat_file]), "no such model directory")


def test_eval_on_a_run_measures_the_data_as_the_run_did(hf_model, tmp_path):
    """One home per setting: `eval RUN` cuts rows at the run's data.max_seq_length and counts reasoning as
    the run's data.reasoning says; a flag still wins; a plain model gets the recipe defaults."""
    from mlx_gemma_tune import prepare, trainer

    thought = "Seventeen has no divisors but one and itself, so it is prime."
    rows = [{"messages": [{"role": "user", "content": "Is 17 prime?"},
                          {"role": "assistant", "content": "Yes.", "reasoning_content": thought}]},
            {"messages": [{"role": "user", "content": " ".join(["Please answer this long question."] * 12)},
                          {"role": "assistant", "content": "No."}]}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = hf_model("gemma4_edge")
    run = tmp_path / "run"
    trainer.run(prepare.prepare_run(model=str(model), data=str(data), out=str(run), sets=(
        "train.iters=1", "data.valid_fraction=0", "data.max_seq_length=48", "data.reasoning=drop")))

    def tokens(*args):
        res = run_cli(["eval", *args, "--data", data, "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    on_run, on_model = tokens(run), tokens(model)
    assert on_run["rows"] == 1 and on_run["dropped"] == [f"{data}:2"]  # cut at 48 tokens: row 2 has no answer left
    assert on_model["rows"] == 2 and on_model["dropped"] == []  # the default 2048 keeps both
    from mlx_lm.utils import load_tokenizer

    hf = load_tokenizer(model)
    answer_only = len(hf.encode("Yes.<turn|>\n", add_special_tokens=False))
    assert on_run["tokens"] == answer_only  # data.reasoning: drop, as the run trained
    assert on_model["tokens"] > answer_only + len(hf.encode(thought, add_special_tokens=False))  # thought trained
    assert tokens(run, "--max-seq-length", "2048")["rows"] == 2  # an explicit flag wins


def test_eval_takes_a_split_folder_as_train_does(hf_model, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split, answer in (("train", "Rex."), ("test", "Tom.")):
        (folder / f"{split}.jsonl").write_text(json.dumps({"prompt": "Name a pet.", "completion": answer}) + "\n")
    res = run_cli(["eval", hf_model("gemma3_text"), "--data", folder, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["data"] == str(folder / "test.jsonl")
    human = run_cli(["eval", hf_model("gemma3_text"), "--data", folder])
    assert f"rows of {folder / 'test.jsonl'}" in human.stdout
