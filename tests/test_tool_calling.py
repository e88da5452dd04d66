"""Tool calling in the OpenAI shape (tools, tool_calls, tool results) through Gemma 4's own template:
what each template trains (the calls and answers, never the results), every malformed row a clear
line, models without a tool format refused, and chat / generate --tools showing calls apart."""

from __future__ import annotations

import json

import pytest

from fixtures.gemma_fixtures import TEMPLATE
from helpers import assert_one_line_error, chat_prompt_tokens, run_cli, trained_runs

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]
SYSTEM = "Use the tools when you need live data."
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>'
RESULT = '{"temperature": 18}'


def _conversation() -> list[dict]:
    """Three user turns with a system prompt; the first is answered through a tool call."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
        {"role": "assistant", "content": "It is 18 degrees."},
        {"role": "user", "content": "Name a cat."},
        {"role": "assistant", "content": "Tom."},
        {"role": "user", "content": "Name a bird."},
        {"role": "assistant", "content": "Tweety."},
    ]


def _tokenizer(hf_model, family):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(hf_model(family))


@pytest.mark.parametrize("thinking", [False, True], ids=["thinking-off", "thinking-on"])
@pytest.mark.parametrize("family", ["gemma4_edge", "gemma4_dense", "gemma4_moe"])
def test_calls_and_answers_train_tool_results_never(family, thinking, hf_model):
    """The mask of every turn of a 3-turn conversation with a system prompt and a tool call, per
    template, thinking off and on: each trained run follows exactly the prompt `chat` sends at that
    point, and is the call (with the <|tool_response> token that ends it) or an answer."""
    from mlx_gemma_tune import data

    tok = _tokenizer(hf_model, family)
    hf = data.hf_tokenizer(tok)
    msgs = _conversation()
    answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if thinking:
        for k, i in enumerate(answers):
            msgs[i]["reasoning_content"] = f"Thought {k}."
    examples = data.encode_conversation(tok, msgs, "tools.jsonl:1", tools=TOOLS)
    # one sequence where every turn renders as its prompt + answer (E2B/E4B, thinking off), else one per turn
    assert len(examples) == (1 if TEMPLATE[family] == "gemma4" and not thinking else 4)
    runs = [(ex, run) for ex in examples for run in trained_runs(ex)]
    assert len(runs) == 4
    eot = "<turn|>\n"
    if thinking:
        want = [f"<|channel>thought\nThought 0.<channel|>{CALL}",
                "Thought 1.<channel|>It is 18 degrees." + eot,  # after a tool result the prompt opens the thought
                f"<|channel>thought\nThought 2.<channel|>Tom.{eot}",
                f"<|channel>thought\nThought 3.<channel|>Tweety.{eot}"]
    else:
        want = [CALL, "It is 18 degrees." + eot, "Tom." + eot, "Tweety." + eot]
    for k, ((ex, (start, end)), i) in enumerate(zip(runs, answers)):
        history = [{kk: v for kk, v in m.items() if kk != "reasoning_content"} for m in msgs[:i]]
        assert ex.tokens[:start] == chat_prompt_tokens(tok, history, thinking, TOOLS), (family, k)
        assert hf.decode(ex.tokens[start:end]) == want[k], (family, k)
    for ex in examples:  # the tool's result is context, never a target
        trained = hf.decode([t for t, m in zip(ex.tokens, ex.mask) if m])
        assert "temperature" not in trained and "response:" not in trained
    # the result is in the context of the answer after it, as the template writes it
    answer_ex, (start, _) = runs[1]
    assert hf.decode(answer_ex.tokens[:start]).endswith(
        '<|tool_response>response:get_weather{value:<|"|>{"temperature": 18}<|"|>}<tool_response|>'
        + ("<|channel>thought\n" if thinking else ""))


def _row(**changes) -> dict:
    """An OpenAI-API-shaped row: arguments as a JSON string, the call's content null, tools declared."""
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
            {"role": "assistant", "content": "It is 18 degrees."}]
    return {"tools": TOOLS, "messages": msgs} | changes


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_openai_shaped_row_reads_trains_and_checks(hf_model, tmp_path):
    from mlx_gemma_tune import dataset_files

    object_result = _row()
    object_result["messages"][2]["content"] = {"temperature": 18}  # some exporters keep the result an object
    path = _write(tmp_path / "tools.jsonl", [_row(), object_result, {"messages": [
        {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}])
    rows = dataset_files.read_rows(path)
    assert rows[0].messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert rows[1].messages[2]["content"] == RESULT and rows[0].tools == TOOLS and rows[2].tools is None
    model = hf_model("gemma4_edge")
    check = run_cli(["data", "check", path, "--model", model, "--json"])
    assert check.exit_code == 0, check.output
    rep = json.loads(check.stdout)
    assert rep["refused"] == [] and rep["tool_use"] == 2 and rep["empty"] == 0  # a call without text is not empty
    human = run_cli(["data", "check", path, "--model", model])
    assert "2 row(s): the calls and answers are trained" in human.stdout
    res = run_cli(["train", "--model", model, "--data", path, "-o", tmp_path / "run", "--set", "train.iters=2",
                   "--set", "data.valid_fraction=0", "--set", "lora.rank=4", "--set", "train.report_every=1"])
    assert res.exit_code == 0, res.output
    ev = run_cli(["eval", model, "--data", path, "--json"])
    assert ev.exit_code == 0, ev.output
    hf = _tokenizer(hf_model, "gemma4_edge")
    n = len(hf.encode(CALL + "It is 18 degrees.<turn|>\n", add_special_tokens=False))
    assert json.loads(ev.stdout)["tokens"] == 2 * n + len(hf.encode("Hello.<turn|>\n", add_special_tokens=False))


@pytest.mark.parametrize("family", ["gemma3_text", "gemma3n"])
def test_a_model_without_a_tool_format_refuses_tool_rows_in_one_line(family, hf_model, tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}
    path = _write(tmp_path / "tools.jsonl", [good, _row(), _row()])
    res = run_cli(["train", "--model", hf_model(family), "--data", path, "-o", tmp_path / "run"])
    assert_one_line_error(res, f"{path}:2", "uses tools", "no tool-calling format", "Gemma 4")
    assert not (tmp_path / "run").exists()
    check = run_cli(["data", "check", path, "--model", hf_model(family), "--json"])
    assert check.exit_code == 1
    assert [r.split(": ")[0] for r in json.loads(check.stdout)["refused"]] == [f"{path}:2", f"{path}:3"]


def _bad(messages=None, **row):
    return {"messages": messages} | row if messages is not None else _row(**row)


def _call(args='{"city": "Paris"}', content=None, call_id="call_1"):
    return {"role": "assistant", "content": content, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": args}}]}


USER = {"role": "user", "content": "Weather in Paris?"}
RESULT_MSG = {"role": "tool", "tool_call_id": "call_1", "content": RESULT}
ANSWER = {"role": "assistant", "content": "It is 18 degrees."}


@pytest.mark.parametrize(("row", "words"), [
    (_bad([USER, RESULT_MSG, ANSWER]), ["message 1 is a tool result that does not follow an assistant tool call"]),
    (_bad([USER, _call(), {**RESULT_MSG, "tool_call_id": "call_9"}, ANSWER]), ["call_9", "did not make"]),
    (_bad([USER, _call(args="{city: Paris"), RESULT_MSG, ANSWER]), ["message 1 tool call 0 arguments", "not valid JSON"]),
    (_bad([USER, _call(args="[1, 2]"), RESULT_MSG, ANSWER]), ["arguments must be a JSON object"]),
    (_bad([USER, _call(content="Let me look."), RESULT_MSG, ANSWER]), ["message 1 has tool_calls and text"]),
    (_bad(tools=[{"type": "function", "function": {"description": "no name"}}]), ["tool 0 needs a function name"]),
    (_bad(tools="not json"), ["'tools' is a string that is not valid JSON"]),
    (_bad([USER, {"role": "tool", "content": None}, ANSWER]), ["message 1 is a tool result without content"]),
], ids=["orphan-result", "unknown-call-id", "bad-json-arguments", "list-arguments", "call-with-text", "nameless-tool",
        "tools-not-json", "result-without-content"])
def test_malformed_tool_rows_are_one_line_naming_the_row(row, words, hf_model, tmp_path):
    path = _write(tmp_path / "bad.jsonl", [_row(), row])
    res = run_cli(["data", "check", path])
    assert_one_line_error(res, f"{path}:2", *words)


def test_a_streamed_call_splits_the_same_wherever_the_pieces_break():
    from mlx_gemma_tune.tools import calls_apart, describe, split_calls

    reply = 'Checking. <|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:2}<tool_call|><|tool_response>'
    want = ("Checking. ", [{"name": "get_weather", "arguments": {"city": "Paris, FR", "days": 2}}])
    assert split_calls(reply) == want
    for i in range(len(reply) + 1):
        for j in range(i, len(reply) + 1, 5):
            pieces = [("answer", p) for p in (reply[:i], reply[i:j], reply[j:])]
            answer, calls = "", []
            for kind, piece in calls_apart(pieces):
                answer, calls = (answer + piece, calls) if kind == "answer" else (answer, [*calls, piece])
            assert (answer, calls) == want, (i, j)
    assert describe(want[1][0]) == 'get_weather(city="Paris, FR", days=2)'
    # a model that has not learned the format: the raw text is kept, not lost
    [(kind, call)] = list(calls_apart([("answer", "<|tool_call>call:oops{<tool_call|>")]))
    assert kind == "tool_call" and call["arguments"] is None and describe(call) == "call:oops{"


@pytest.fixture(scope="module")
def tool_run(hf_model, tmp_path_factory):
    """A gemma4_edge adapter trained to call get_weather(city="Paris") for any question, then to
    answer "Sunny." once the result is in."""
    from mlx_gemma_tune import prepare, trainer

    root = tmp_path_factory.mktemp("tools")
    rows = [{"tools": TOOLS, "messages": [{"role": "user", "content": q}, _call(), RESULT_MSG,
                                          {"role": "assistant", "content": "Sunny."}]}
            for q in ("Weather in Paris?", "Is it warm?", "Will it rain?", "Any sun today?")]
    data_file = _write(root / "t.jsonl", rows)
    trainer.run(prepare.prepare_run(model=str(hf_model("gemma4_edge")), data=str(data_file), out=str(root / "run"),
                                    sets=("train.lr=3e-3", "lora.rank=8", "lora.dropout=0.0", "train.iters=80",
                                          "train.batch_size=4", "data.valid_fraction=0", "train.schedule=constant")))
    (root / "tools.json").write_text(json.dumps({"tools": TOOLS}))
    return root


def test_generate_and_chat_show_calls_apart_and_chat_takes_the_result(tool_run, hf_model, tmp_path):
    run, tools = tool_run / "run", tool_run / "tools.json"
    greedy = ["--temp", "0", "--max-tokens", "40", "--tools", tools]
    res = run_cli(["generate", run, "--prompt", "Weather in Oslo?", "--json", *greedy])
    assert res.exit_code == 0, res.output
    [answer] = json.loads(res.stdout)
    assert answer["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert answer["answer"] == ""
    plain = run_cli(["generate", run, "--prompt", "Weather in Oslo?", *greedy])
    assert plain.exit_code == 0 and plain.stdout.splitlines() == ['tool call: get_weather(city="Paris")']
    saved = tmp_path / "chat.jsonl"
    chat = run_cli(["chat", run, *greedy], input=f"Weather in Oslo?\n{RESULT}\n/save {saved}\n/quit\n")
    assert chat.exit_code == 0, chat.output
    assert 'tool call: get_weather(city="Paris")' in chat.stdout and "model: Sunny." in chat.stdout
    assert "<|tool_call>" not in chat.stdout + plain.stdout
    # the saved conversation is a training row: tools, the call, its result, the answer
    [row] = [json.loads(x) for x in saved.read_text().splitlines()]
    assert row["tools"] == TOOLS
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert row["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert row["messages"][2]["content"] == RESULT and row["messages"][3]["content"] == "Sunny."
    check = run_cli(["data", "check", saved, "--model", hf_model("gemma4_edge"), "--json"])
    assert check.exit_code == 0 and json.loads(check.stdout)["tool_use"] == 1
    # /compare: both answers with their calls as lines; the tuned model's call then takes its result
    compare = run_cli(["chat", run, *greedy], input=f"/compare\nWeather in Oslo?\n{RESULT}\n/quit\n")
    assert compare.exit_code == 0, compare.output
    assert 'tuned: tool call: get_weather(city="Paris")' in compare.stdout
    assert "result of get_weather> " in compare.stdout and "model: Sunny." in compare.stdout


def test_tools_on_a_model_without_a_tool_format_or_a_bad_file_is_one_line(hf_model, tool_run, tmp_path):
    tools = tool_run / "tools.json"
    res = run_cli(["generate", hf_model("gemma3_text"), "--prompt", "Hi", "--tools", tools])
    assert_one_line_error(res, "--tools", "no tool-calling format")
    bad = tmp_path / "tools.json"
    bad.write_text('[{"type": "function", "function": {"name": "x"}},\n oops]')
    assert_one_line_error(run_cli(["chat", hf_model("gemma4_edge"), "--tools", bad]), f"{bad}:2", "not valid JSON")
    assert_one_line_error(run_cli(["generate", hf_model("gemma4_edge"), "--prompt", "Hi", "--tools",
                                   tmp_path / "none.json"]), "none.json", "no such file")
