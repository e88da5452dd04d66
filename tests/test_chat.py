"""`chat` and `generate`: streaming answers, adapter hot-swap, base vs tuned, transcripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ANSWER
from helpers import assert_one_line_error, run_cli

GREEDY = ["--temp", "0", "--max-tokens", "24"]


@pytest.mark.parametrize("family,marker", [("gemma3_text", "<end_of_turn>"), ("gemma4_edge", "<turn|>")])
def test_generation_stops_at_end_of_turn(family, marker, trained_run):
    from mlx_gemma_tune.generate import ChatSession, Sampling

    s = ChatSession.open(str(trained_run(family)), sampling=Sampling(temp=0.0, max_tokens=24))
    text = "".join(s.reply("Largest ocean?"))
    assert text == ANSWER
    assert s.stats.finish_reason == "stop" and s.stats.generated_tokens < 24
    assert marker not in text


def test_adapter_off_and_on_without_reloading(trained_run, monkeypatch):
    from mlx_gemma_tune import models
    from mlx_gemma_tune.chat_commands import run_command
    from mlx_gemma_tune.generate import ChatSession, Sampling

    run = trained_run("gemma3_text")  # trained (and its base loaded) before the loads are counted
    loads = {"n": 0}
    real_load = models.load

    def counting_load(*a, **k):
        loads["n"] += 1
        return real_load(*a, **k)

    monkeypatch.setattr(models, "load", counting_load)
    s = ChatSession.open(str(run), sampling=Sampling(temp=0.7, seed=3, max_tokens=12))
    embed = s.model.model.embed_tokens.weight
    tuned = "".join(s.stream(s.messages_for("Frozen water?")))
    run_command(s, "/adapter off")
    assert not s.adapter_enabled
    base = "".join(s.stream(s.messages_for("Frozen water?")))
    run_command(s, "/adapter on")
    again = "".join(s.stream(s.messages_for("Frozen water?")))
    assert tuned == ANSWER and base != tuned and again == tuned
    assert loads["n"] == 1 and s.model.model.embed_tokens.weight is embed  # the base was never reloaded


def test_chat_session_through_the_cli(trained_run, tmp_path):
    transcript = tmp_path / "chat.jsonl"
    keys = "\n".join(["Capital of France?", "Frozen water?", "/adapter off", "Baby cat?", "/adapter on",
                      "/compare", "Largest ocean?", "/nonsense", "/temp hot", "/save " + str(transcript),
                      "/quit"]) + "\n"
    res = run_cli(["chat", trained_run("gemma3_text"), *GREEDY], input=keys)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert out.count(f"model: {ANSWER}") == 2  # two tuned turns
    assert "adapter off (base model)" in out and "adapter on" in out
    assert f"tuned: {ANSWER}" in out and "base: " in out  # /compare shows both
    assert "unknown command '/nonsense'" in res.stderr and "/help" in res.stderr  # and the chat went on
    assert "/temp needs a number" in res.stderr
    assert f"saved to {transcript}" in out
    assert "tok/s" in res.stderr and "prompt" in res.stderr  # the footer

    # The transcript is training data for `train`.
    from mlx_gemma_tune import dataset_files

    rows = dataset_files.read_rows(transcript)
    assert len(rows) == 1 and rows[0].fmt == "chat"
    msgs = rows[0].messages
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 4
    assert msgs[0]["content"] == "Capital of France?" and msgs[1]["content"] == ANSWER
    assert msgs[-2]["content"] == "Largest ocean?" and msgs[-1]["content"] == ANSWER


def test_chat_help_and_system(trained_run):
    res = run_cli(["chat", trained_run("gemma4_edge"), *GREEDY], input="/help\n/system Be brief.\n/reset\n/quit\n")
    assert res.exit_code == 0, res.output
    assert "/adapter PATH|off|on" in res.stdout and "system prompt set" in res.stdout
    assert "conversation cleared" in res.stdout


def test_generate_compare_json_and_prompts_file(trained_run, hf_model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Baby cat?\n\nFrozen water?\n")
    res = run_cli(["generate", trained_run("gemma3_text"), "--prompts", prompts, "--compare", "--json", *GREEDY])
    assert res.exit_code == 0, res.output
    answers = json.loads(res.stdout)
    assert [a["prompt"] for a in answers] == ["Baby cat?", "Frozen water?"]
    assert all(a["answer"] == ANSWER and a["base"] != ANSWER for a in answers)
    one = run_cli(["generate", trained_run("gemma3_text"), "--prompt", "Baby cat?", *GREEDY])
    assert one.exit_code == 0 and one.stdout.strip() == ANSWER
    side = run_cli(["generate", trained_run("gemma3_text"), "--prompt", "Baby cat?", "--compare", *GREEDY])
    assert side.exit_code == 0 and f"tuned: {ANSWER}" in side.stdout
    # The base side of --compare is the base model's own answer. (Greedy, the random-weight base
    # only emits newlines, stripped to ""; sampled with a seed it writes something to compare.)
    sampled = ["--prompt", "Baby cat?", "--temp", "1.0", "--seed", "5", "--max-tokens", "12", "--json"]
    both = run_cli(["generate", trained_run("gemma3_text"), "--compare", *sampled])
    alone = run_cli(["generate", hf_model("gemma3_text"), *sampled])
    assert both.exit_code == alone.exit_code == 0, both.output + alone.output
    base = json.loads(both.stdout)[0]["base"]
    assert base.strip() and base == json.loads(alone.stdout)[0]["answer"]


def test_generate_with_seed_is_reproducible(trained_run, hf_model):
    """The same seed gives the same sampled text; another seed another (the untuned random-weight
    base at temperature 1 spreads its probability over the whole vocabulary)."""
    def sample(model, seed, *extra):
        res = run_cli(["generate", model, "--prompt", "Hello", "--temp", "1.0", "--seed", seed, "--max-tokens",
                       "12", "--json", *extra])
        assert res.exit_code == 0, res.output
        answer = json.loads(res.stdout)[0]["answer"]
        assert answer.strip(), res.output  # generation produced tokens
        return answer

    run = trained_run("gemma4_edge")
    assert sample(run, 7) == sample(run, 7) == ANSWER
    base = hf_model("gemma4_edge")
    first = sample(base, 7)
    assert sample(base, 7) == first and sample(base, 8) != first


# ---- bad input ----------------------------------------------------------------------------------


def test_missing_model(tmp_path):
    assert_one_line_error(run_cli(["generate", tmp_path / "nope", "--prompt", "hi"]), "no such model directory")
    assert_one_line_error(run_cli(["chat", tmp_path / "nope"], input="/quit\n"), "no such model directory")


def test_adapter_from_another_base_names_it(trained_run, hf_model):
    res = run_cli(["generate", hf_model("gemma4_dense"), "--adapter", trained_run("gemma4_edge"), "--prompt", "hi"])
    assert_one_line_error(res, str(trained_run("gemma4_edge")), f"trained on {hf_model('gemma4_edge')}")
    res = run_cli(["generate", hf_model("gemma3n"), "--adapter", trained_run("gemma3_text"), "--prompt", "hi"])
    assert_one_line_error(res, f"trained on {hf_model('gemma3_text')}")


def test_bad_adapter_swap_keeps_the_current_one(trained_run, hf_model, tmp_path):
    keys = f"/adapter {trained_run('gemma4_edge')}\nBaby cat?\n/quit\n"
    res = run_cli(["chat", trained_run("gemma3_text"), *GREEDY], input=keys)
    assert res.exit_code == 0
    assert "trained on" in res.stderr and f"model: {ANSWER}" in res.stdout  # still the old adapter


def test_prompts_file_problems(trained_run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert_one_line_error(run_cli(["generate", trained_run("gemma3_text"), "--prompts", empty]), "has no prompts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    assert_one_line_error(run_cli(["generate", trained_run("gemma3_text"), "--prompts", bad]), "bad.jsonl:2")
    assert_one_line_error(run_cli(["generate", trained_run("gemma3_text")]), "exactly one of --prompt", code=2)


def test_a_run_whose_base_is_gone_names_it_and_the_command_that_recreates_it(hf_model, tmp_path, monkeypatch):
    """Opening a run never converts: chat / generate / eval / export on a run whose (quantized,
    cached) base was removed say which base and how to recreate it, in one line, and write nothing."""
    import shlex
    import shutil

    from helpers import snapshot
    from mlx_gemma_tune import prepare, trainer

    monkeypatch.setenv("MLX_GEMMA_TUNE_CACHE", str(tmp_path / "cache"))  # a base of its own to remove

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "completion": "Hello."}) + "\n")
    run = tmp_path / "run"
    trainer.run(prepare.prepare_run(model=str(hf_model("gemma3_text")), data=str(data), out=str(run),
                                    sets=("train.iters=1", "model.quantize=4", "data.valid_fraction=0")))
    base = Path(json.loads((run / "base.json").read_text())["base"])
    assert (base / "config.json").is_file() and base != hf_model("gemma3_text")  # the 4-bit base in the cache
    assert tmp_path / "cache" in base.parents
    shutil.rmtree(base)
    before = snapshot(tmp_path, quick=True)
    for args in (["chat", run], ["generate", run, "--prompt", "Hi"], ["eval", run, "--data", data],
                 ["export", run, "--format", "peft", "-o", tmp_path / "peft"]):
        res = run_cli(args, input="Hi\n/quit\n")
        line = assert_one_line_error(res, str(run), "base model is missing", str(base), "mlx-gemma-tune convert",
                                     "--quantize 4")
        assert not base.exists() and snapshot(tmp_path, quick=True) == before, args
    (run / "base.json").unlink()  # a run from before base.json: its recipe maps to the same cache directory
    assert_one_line_error(run_cli(["generate", run, "--prompt", "Hi"]), "base model is missing", str(base))
    # the command the line gives recreates the base, and the run opens again
    command = shlex.split(line.split("recreate it with: ", 1)[1].rstrip(")"))
    assert command[0] == "mlx-gemma-tune"
    assert run_cli(command[1:]).exit_code == 0
    ok = run_cli(["generate", run, "--prompt", "Hi", "--max-tokens", "2", "--temp", "0"])
    assert ok.exit_code == 0, ok.output
