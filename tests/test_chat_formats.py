"""Chat formats of the real checkpoints: what each assistant turn trains is what the model must emit
after the prompt `chat` / `generate` send at that point, for every family's template (Gemma 3 / 3n,
Gemma 4 E2B/E4B, Gemma 4 26B-A4B / 31B with the empty thought block); refused rows, text rows that
already hold special tokens, and eval rows left without answer tokens are clear lines."""

from __future__ import annotations

import json

import pytest

from fixtures.gemma_fixtures import FAMILIES, TEMPLATE
from helpers import assert_one_line_error, chat_prompt_tokens, run_cli
from helpers import trained_runs as _runs

SYSTEM = "Answer in one word."
TURNS = [("Name a dog.", "Rex."), ("Name a cat.", "Tom."), ("Name a bird.", "Tweety.")]
END_OF_TURN = {"gemma3": "<end_of_turn>", "gemma4": "<turn|>", "gemma4_large": "<turn|>"}


def _conversation(system: bool = True) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    for q, a in TURNS:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def _tokenizer(hf_model, family):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(hf_model(family))


def _count(hf_model, family, text: str) -> int:
    from mlx_gemma_tune import data

    return len(data.hf_tokenizer(_tokenizer(hf_model, family))(text, add_special_tokens=False)["input_ids"])


def _prompt_tokens(tok, messages) -> list[int]:
    return chat_prompt_tokens(tok, messages)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_turn_trains_the_continuation_of_its_generation_prompt(family, hf_model):
    from mlx_gemma_tune import data

    tok = _tokenizer(hf_model, family)
    hf = data.hf_tokenizer(tok)
    msgs = _conversation()
    examples = data.encode_conversation(tok, msgs, "chat.jsonl:1")
    # one sequence where a past turn renders as its prompt + answer; one per turn on 26B / 31B
    assert len(examples) == (3 if TEMPLATE[family] == "gemma4_large" else 1)
    runs = [(ex, run) for ex in examples for run in _runs(ex)]
    assert len(runs) == 3
    eot = END_OF_TURN[TEMPLATE[family]]
    for k, (ex, (start, end)) in enumerate(runs):
        history = msgs[: msgs.index({"role": "assistant", "content": TURNS[k][1]})]
        # the masked tokens before the turn are exactly the prompt inference sends ...
        assert ex.tokens[:start] == _prompt_tokens(tok, history), (family, k)
        # ... and the trained tokens exactly the answer and the end of the turn
        assert hf.decode(ex.tokens[start:end]) == f"{TURNS[k][1]}{eot}\n", (family, k)
    if TEMPLATE[family] == "gemma4_large":
        assert hf.decode(examples[0].tokens).endswith(
            f"<|turn>model\n<|channel>thought\n<channel|>{TURNS[0][1]}{eot}\n")


def test_a_large_gemma4_chat_row_trains_evaluates_and_checks(hf_model, tmp_path):
    """Report 1: every chat row was refused on the 26B/31B template ("renders turn 1 differently")."""
    data_file = tmp_path / "data.jsonl"
    data_file.write_text(json.dumps({"messages": [{"role": "user", "content": "Name a dog."},
                                                  {"role": "assistant", "content": "Rex."}]}) + "\n")
    model = hf_model("gemma4_dense")
    check = run_cli(["data", "check", data_file, "--model", model, "--json"])
    assert check.exit_code == 0, check.output
    assert json.loads(check.stdout)["refused"] == []
    ev = run_cli(["eval", model, "--data", data_file, "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["tokens"] == _count(hf_model, "gemma4_dense", "Rex.<turn|>\n")  # the answer only
    res = run_cli(["train", "--model", model, "--data", data_file, "-o", tmp_path / "run", "--set", "train.iters=2",
                   "--set", "train.report_every=1", "--set", "data.valid_fraction=0", "--set", "lora.rank=4"])
    assert res.exit_code == 0, res.output
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_multi_turn_row_on_the_large_template_stays_in_one_split(hf_model, tmp_path):
    """One example per turn on 26B/31B: validation holds out whole conversations, never half of one."""
    from mlx_gemma_tune import prepare

    rows = [{"messages": _conversation(system=False)} for _ in range(4)]
    for i, r in enumerate(rows):
        r["messages"][1]["content"] = f"Rex {i}."
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = prepare.prepare_run(model=str(hf_model("gemma4_moe")), data=str(data_file), out=str(tmp_path / "r"),
                                   sets=("data.valid_fraction=0.25",))
    train, valid = prepared.train, prepared.valid
    assert len(train) == 9 and len(valid) == 3  # 3 rows x 3 turns, 1 row x 3 turns
    assert {e.source for e in train}.isdisjoint({e.source for e in valid})


# ---- refused rows ------------------------------------------------------------------------------


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TWO_USERS = {"messages": [{"role": "user", "content": "Hi."}, {"role": "user", "content": "Still there?"},
                          {"role": "assistant", "content": "Yes."}]}
GOOD = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}


def test_data_check_lists_every_row_the_template_refuses(hf_model, tmp_path):
    """Report 3: Gemma 3's template refuses two user turns in a row: an internal error before."""
    path = _write(tmp_path / "data.jsonl", [TWO_USERS, GOOD, TWO_USERS])
    res = run_cli(["data", "check", path, "--model", hf_model("gemma3_text")])
    line = assert_one_line_error(res, f"{path}", "2 row(s)", "chat template", "merge consecutive user turns")
    assert "internal error" not in line
    listed = [x.strip() for x in res.stdout.splitlines() if "Conversation roles must alternate" in x]
    assert [x.split(": ")[0] for x in listed] == [f"{path}:1", f"{path}:3"]
    as_json = run_cli(["data", "check", path, "--model", hf_model("gemma3_text"), "--json"])
    assert as_json.exit_code == 1
    assert [r.split(": ")[0] for r in json.loads(as_json.stdout)["refused"]] == [f"{path}:1", f"{path}:3"]


@pytest.mark.parametrize("command", ["train", "eval"])
def test_train_and_eval_name_the_refused_row(command, hf_model, tmp_path):
    path = _write(tmp_path / "data.jsonl", [GOOD, TWO_USERS])
    args = (["train", "--model", hf_model("gemma3_text"), "--data", path, "-o", tmp_path / "run"] if command == "train"
            else ["eval", hf_model("gemma3_text"), "--data", path])
    res = run_cli(args)
    assert_one_line_error(res, f"{path}:2", "the model's chat template refuses this conversation",
                          "Conversation roles must alternate", "merge consecutive user turns")
    assert not (tmp_path / "run").exists()


# ---- text rows that already hold special tokens -----------------------------------------------


@pytest.mark.parametrize("family", ["gemma3_text", "gemma4_edge"])
def test_text_rows_exported_with_the_chat_template_get_no_second_bos_or_eos(family, hf_model, tmp_path):
    """Report 4: apply_chat_template(tokenize=False) text starts with <bos>: it was encoded <bos><bos>."""
    from mlx_gemma_tune import data

    tok = _tokenizer(hf_model, family)
    hf = data.hf_tokenizer(tok)
    text = hf.apply_chat_template(GOOD["messages"], tokenize=False)
    assert text.startswith("<bos>")
    ex, adjusted = data.encode_text(tok, text, "t.jsonl:1")
    assert ex.tokens == list(hf(text, add_special_tokens=False)["input_ids"])  # nothing added
    assert ex.tokens.count(hf.bos_token_id) == 1 and hf.eos_token_id not in ex.tokens
    assert adjusted == ["starts with <bos>", f"ends with {END_OF_TURN[TEMPLATE[family]]}"]
    plain, none = data.encode_text(tok, "Just some text.", "t.jsonl:2")
    assert plain.tokens[0] == hf.bos_token_id and plain.tokens[-1] == hf.eos_token_id and none == []

    path = _write(tmp_path / "t.jsonl", [{"text": text}, {"text": "Just some text."}])
    rep = run_cli(["data", "check", path, "--model", hf_model(family), "--json"])
    assert rep.exit_code == 0, rep.output
    rep = json.loads(rep.stdout)
    assert rep["special_tokens_adjusted"] == 1 and rep["special_tokens_adjusted_at"][0].startswith(f"{path}:1 (")
    human = run_cli(["data", "check", path, "--model", hf_model(family)])
    assert "1 text row(s) already hold them" in human.stdout


# ---- eval never reports NaN -------------------------------------------------------------------


def test_eval_drops_rows_left_without_answer_tokens_and_never_prints_nan(hf_model, tmp_path):
    """Report 5: `eval --max-seq-length 40` on a row whose answer starts after token 40 printed NaN."""
    long_q = {"messages": [{"role": "user", "content": "Tell me " + "more and " * 30 + "then stop."},
                           {"role": "assistant", "content": "Done."}]}
    only_long = _write(tmp_path / "long.jsonl", [long_q])
    res = run_cli(["eval", hf_model("gemma3_text"), "--data", only_long, "--max-seq-length", "40", "--json"])
    assert_one_line_error(res, str(only_long), "no row has an answer token left", "--max-seq-length")
    assert "NaN" not in res.output

    mixed = _write(tmp_path / "mixed.jsonl", [long_q, GOOD])
    res = run_cli(["eval", hf_model("gemma3_text"), "--data", mixed, "--max-seq-length", "40", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)  # strict JSON: json.loads accepts NaN, so look for it too
    assert "NaN" not in res.stdout and out["rows"] == 1 and out["dropped"] == [f"{mixed}:1"]
    assert out["loss"] > 0 and out["tokens"] == _count(hf_model, "gemma3_text", "Hello.<end_of_turn>\n")
    human = run_cli(["eval", hf_model("gemma3_text"), "--data", mixed, "--max-seq-length", "40"])
    assert human.exit_code == 0 and f"{mixed}:1" in human.stderr and "no answer token left" in human.stderr


def test_json_output_has_no_nan():
    from mlx_gemma_tune import ui

    assert ui._finite({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == {"a": None, "b": [1.0, None],
                                                                                     "c": "x"}


# ---- reasoning (thinking) ----------------------------------------------------------------------

THOUGHT, ANSWER = "It has no divisors but 1 and itself.", "Yes, 17 is prime."
THINKING_ROW = {"messages": [{"role": "user", "content": "Is 17 prime?"},
                             {"role": "assistant", "content": f"<|channel>thought\n{THOUGHT}<channel|>{ANSWER}"}]}


def _thinking_prompt(tok, messages) -> list[int]:
    """The generation prompt with thinking on (what `chat --thinking` sends)."""
    from mlx_gemma_tune import data

    hf = data.hf_tokenizer(tok)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    return list(hf(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("family", ["gemma4_edge", "gemma4_dense"])
@pytest.mark.parametrize("form", ["block", "field"])
def test_a_thought_is_trained_as_the_model_thinks(family, form, hf_model):
    """Report 2: the thought was silently dropped; only 'Yes, 17 is prime.<turn|>' was trained."""
    from mlx_gemma_tune import data

    tok = _tokenizer(hf_model, family)
    hf = data.hf_tokenizer(tok)
    msgs = THINKING_ROW["messages"] if form == "block" else [
        THINKING_ROW["messages"][0], {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT}]
    [ex] = data.encode_conversation(tok, msgs, "r.jsonl:1")
    [(start, end)] = _runs(ex)
    assert ex.tokens[:start] == _thinking_prompt(tok, msgs[:1])
    assert hf.decode(ex.tokens[:start]).startswith("<bos><|turn>system\n<|think|>")  # thinking on
    assert hf.decode(ex.tokens[start:end]) == f"<|channel>thought\n{THOUGHT}<channel|>{ANSWER}<turn|>\n"
    [dropped] = data.encode_conversation(tok, msgs, "r.jsonl:1", reasoning="drop")
    assert hf.decode([t for t, m in zip(dropped.tokens, dropped.mask) if m]) == f"{ANSWER}<turn|>\n"
    with pytest.raises(data.InputError, match="data.reasoning is error"):
        data.encode_conversation(tok, msgs, "r.jsonl:1", reasoning="error")


@pytest.mark.parametrize("family", ["gemma4_edge", "gemma4_dense", "gemma4_moe"])
def test_three_thinking_turns_with_a_system_prompt(family, hf_model):
    """Each turn: the prompt with thinking on (past thoughts stripped by the template, as at inference),
    then the thought and the answer."""
    from mlx_gemma_tune import data

    tok = _tokenizer(hf_model, family)
    hf = data.hf_tokenizer(tok)
    msgs = _conversation()
    for k, m in enumerate(m for m in msgs if m["role"] == "assistant"):
        m["reasoning_content"] = f"Thought {k}."
    examples = data.encode_conversation(tok, msgs, "r.jsonl:1")
    assert len(examples) == 3
    for k, ex in enumerate(examples):
        [(start, end)] = _runs(ex)
        history = msgs[: 2 + 2 * k]
        assert ex.tokens[:start] == _thinking_prompt(tok, history)
        assert "Thought" not in hf.decode(ex.tokens[:start])  # past thoughts are not in the context
        assert hf.decode(ex.tokens[start:end]) == f"<|channel>thought\nThought {k}.<channel|>{TURNS[k][1]}<turn|>\n"


def test_reasoning_on_a_model_without_thinking_is_one_clear_line(hf_model, tmp_path):
    path = _write(tmp_path / "r.jsonl", [THINKING_ROW, GOOD])
    base = ["train", "--model", hf_model("gemma3_text"), "--data", path, "--set", "data.valid_fraction=0",
            "--set", "train.iters=1"]
    assert_one_line_error(run_cli([*base, "-o", tmp_path / "a"]), f"{path}:1", "no thinking format",
                          "data.reasoning: drop")
    assert not (tmp_path / "a").exists()
    res = run_cli([*base, "-o", tmp_path / "b", "--set", "data.reasoning=drop"])
    assert res.exit_code == 0, res.output
    # eval has no recipe: on a model that cannot think it scores the answers alone
    ev = run_cli(["eval", hf_model("gemma3_text"), "--data", path, "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["tokens"] == _count(hf_model, "gemma3_text", f"{ANSWER}<end_of_turn>\n") + \
        _count(hf_model, "gemma3_text", "Hello.<end_of_turn>\n")
    check = run_cli(["data", "check", path, "--json"])
    assert check.exit_code == 0 and json.loads(check.stdout)["reasoning"] == 1
    human = run_cli(["data", "check", path, "--model", hf_model("gemma4_edge")])
    assert human.exit_code == 0 and "1 row(s): the thought is trained" in human.stdout


@pytest.fixture(scope="module")
def thinking_run(hf_model, tmp_path_factory):
    """A gemma4_edge adapter trained to think "Because." before answering "Paris." (thinking on)."""
    from mlx_gemma_tune import prepare, trainer

    root = tmp_path_factory.mktemp("thinking")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Paris.",
                                                           "reasoning_content": "Because."}]}
            for q in ("Capital of France?", "Two plus two?", "Colour of the sky?", "Largest ocean?")]
    data_file = _write(root / "t.jsonl", rows)
    trainer.run(prepare.prepare_run(model=str(hf_model("gemma4_edge")), data=str(data_file), out=str(root / "run"),
                                    sets=("train.lr=3e-3", "lora.rank=8", "lora.dropout=0.0", "train.iters=80",
                                          "train.batch_size=4", "data.valid_fraction=0", "train.schedule=constant")))
    return root / "run"


def test_generate_and_chat_show_the_thought_apart(thinking_run, hf_model):
    greedy = ["--temp", "0", "--max-tokens", "24", "--thinking"]
    res = run_cli(["generate", thinking_run, "--prompt", "Baby cat?", "--json", *greedy])
    assert res.exit_code == 0, res.output
    [answer] = json.loads(res.stdout)
    assert answer["thinking"] == "Because." and answer["answer"] == "Paris."
    plain = run_cli(["generate", thinking_run, "--prompt", "Baby cat?", *greedy])
    assert plain.exit_code == 0 and plain.stdout.splitlines() == ["thinking: Because.", "Paris."]
    chat = run_cli(["chat", thinking_run, *greedy], input="Frozen water?\n/thought\n/quit\n")
    assert chat.exit_code == 0 and "thinking: Because.\nmodel: Paris." in chat.stdout
    assert chat.stdout.count("thinking: Because.") == 2  # /thought shows the last thought again
    assert "<|channel>" not in chat.stdout + plain.stdout
    no_mode = run_cli(["generate", hf_model("gemma3_text"), "--prompt", "Hi", "--thinking"])
    assert_one_line_error(no_mode, "--thinking", "no thinking mode")


# ---- edge cases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("answer", ["<b>Rex</b>", ""])
def test_answers_that_start_like_a_marker_or_are_empty_keep_every_character(family, answer, hf_model):
    """The answer starts where the template puts the message, not where its text stops matching the
    generation prompt (26B/31B's prompt continues '<|channel>...', which '<b>' also starts like)."""
    from mlx_gemma_tune import data

    tok = _tokenizer(hf_model, family)
    hf = data.hf_tokenizer(tok)
    msgs = [{"role": "user", "content": "Name a dog."}, {"role": "assistant", "content": answer}]
    [ex] = data.encode_conversation(tok, msgs, "e.jsonl:1")
    [(start, end)] = _runs(ex)
    assert hf.decode(ex.tokens[start:end]) == f"{answer}{END_OF_TURN[TEMPLATE[family]]}\n"
    assert ex.tokens[:start] == _prompt_tokens(tok, msgs[:1])


@pytest.mark.parametrize("family", ["gemma3_text", "gemma4_edge"])
def test_a_conversation_that_starts_with_the_assistant_is_one_clear_line(family, hf_model, tmp_path):
    path = _write(tmp_path / "a.jsonl", [{"messages": [{"role": "assistant", "content": "Hi."},
                                                       {"role": "user", "content": "Hello."}]}, GOOD])
    res = run_cli(["train", "--model", hf_model(family), "--data", path, "-o", tmp_path / "run"])
    assert_one_line_error(res, f"{path}:1", "starts with an assistant turn")
    check = run_cli(["data", "check", path, "--model", hf_model(family), "--json"])
    assert check.exit_code == 1 and json.loads(check.stdout)["refused"][0].startswith(f"{path}:1: starts with")


def test_reasoning_in_content_parts_and_data_check_on_a_model_without_thinking(hf_model, tmp_path):
    from mlx_gemma_tune import data

    parts = {"role": "assistant", "content": [{"type": "text", "text": f"<|channel>thought\n{THOUGHT}<channel|>"},
                                              {"type": "text", "text": ANSWER}]}
    assert data.split_reasoning(parts) == (THOUGHT, ANSWER)
    # data check measures rows as eval counts them: answers only on a model that cannot think
    path = _write(tmp_path / "r.jsonl", [THINKING_ROW])
    res = run_cli(["data", "check", path, "--model", hf_model("gemma3_text"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["refused"] == [] and rep["reasoning"] == 1


def test_a_streamed_thought_splits_the_same_wherever_the_pieces_break():
    from mlx_gemma_tune.thinking import thought_and_answer

    def joined(pieces):
        out = {"thought": "", "answer": ""}
        for kind, text in thought_and_answer(pieces):
            out[kind] += text
        return out

    reply = f"<|channel>thought\n{THOUGHT}<channel|>\n\n{ANSWER}"
    want = {"thought": THOUGHT, "answer": ANSWER}
    assert joined([reply]) == want and joined(list(reply)) == want
    for i in range(len(reply) + 1):
        for j in range(i, len(reply) + 1, 3):
            assert joined([reply[:i], reply[i:j], reply[j:]]) == want, (i, j)
    assert joined(["A plain ", "answer."]) == {"thought": "", "answer": "A plain answer."}


def test_on_a_terminal_chat_folds_the_thought_once_the_reply_is_complete(monkeypatch):
    import io

    from rich.console import Console

    from mlx_gemma_tune import ui
    from mlx_gemma_tune.ui import chat as ui_chat

    screen = io.StringIO()
    monkeypatch.setattr(ui, "out", Console(file=screen, force_terminal=True, width=100))
    parts = [("thought", "It has no divisors "), ("thought", "but 1 and itself."), ("answer", ANSWER)]
    assert ui_chat.stream_reply(iter(parts), fold_thought=True) == ANSWER
    last_frame = screen.getvalue().rsplit("\x1b[2K", 1)[-1]  # rich's Live rewrites its lines on every update
    assert "thought, 8 words (/thought shows it)" in screen.getvalue()
    assert "itself" not in last_frame
    screen.truncate(0)
    ui_chat.stream_reply(iter(parts))  # generate: the thought stays open
    assert "/thought" not in screen.getvalue() and "itself." in screen.getvalue()
