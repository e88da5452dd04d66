"""Tool calling (function calling) in Gemma 4's native format, for dataset rows and for chat.

Rows and chats use the OpenAI Chat Completions shape: a `tools` list of function declarations
(`{"type": "function", "function": {"name", "description", "parameters": JSON schema}}`), assistant
messages with `tool_calls` (`{"id", "type": "function", "function": {"name", "arguments"}}`), and
`tool` messages carrying each result (`tool_call_id`, `content`). The model's own chat template
renders them; Gemma 4's writes a call as `<|tool_call>call:NAME{key:value,...}<tool_call|>`, ends
the model's output with `<|tool_response>` (a stop token: the caller runs the tool), and puts the
results in the same model turn as `<|tool_response>response:NAME{value:...}<tool_response|>`.
Gemma 3 and 3n have no tool format. Replies are parsed with mlx-lm's Gemma 4 tool parser.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from mlx_gemma_tune.errors import InputError

CALL_OPEN, CALL_CLOSE, RESPONSE_OPEN = "<|tool_call>", "<tool_call|>", "<|tool_response>"
MARKERS = (CALL_OPEN, CALL_CLOSE, RESPONSE_OPEN)


def can_call_tools(hf) -> bool:
    """The model has a tool-calling format: its tokenizer has Gemma 4's call / response tokens and
    its chat template writes calls (mlx-lm infers its Gemma 4 tool parser the same way)."""
    vocab = hf.get_vocab()
    template = hf.chat_template if isinstance(getattr(hf, "chat_template", None), str) else ""
    return all(m in vocab for m in MARKERS) and CALL_OPEN in template


def _as_json(value, what: str, where: str):
    """value, or the JSON it holds when it is a string (datasets often store these as text)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is a string that is not valid JSON ({exc.msg})", where=where) from None


def _function(item, what: str, where: str, hint: str) -> dict:
    """The function object of a tool or a call in the OpenAI shape (`{"function": {...}}`, or bare),
    with a name. Raises InputError naming `what`."""
    fn = item.get("function", item) if isinstance(item, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InputError(f"{what} needs a function name", where=where, hint=hint)
    return fn


def check_tools(tools, where: str) -> list[dict]:
    """A row's / file's `tools` list in the OpenAI shape, each `{"type": "function", "function":
    {"name", "description"?, "parameters"?}}` (a bare `{"name", ...}` is wrapped). Raises
    InputError naming `where` and the tool."""
    tools = _as_json(tools, "'tools'", where)
    if not isinstance(tools, list) or not tools:
        raise InputError("'tools' must be a non-empty list of function declarations", where=where,
                         hint='each: {"type": "function", "function": {"name": ..., "description": ..., '
                              '"parameters": {JSON schema}}}')
    out = []
    for j, tool in enumerate(tools):
        fn = _function(tool, f"tool {j}", where, '{"type": "function", "function": {"name": "get_weather", ...}}')
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InputError(f"tool {j} ({fn['name']}) parameters must be a JSON schema object", where=where)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise InputError(f"tool {j} ({fn['name']}) description must be a string", where=where)
        out.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    return out


def check_tool_calls(calls, i: int, where: str) -> list[dict]:
    """Message i's `tool_calls`, normalised: arguments a JSON object (parsed when given as a JSON
    string, as the OpenAI API sends them). Raises InputError naming `where`."""
    calls = _as_json(calls, f"message {i} tool_calls", where)
    if not isinstance(calls, list) or not calls:
        raise InputError(f"message {i} tool_calls must be a non-empty list", where=where)
    out = []
    for j, call in enumerate(calls):
        fn = _function(call, f"message {i} tool call {j}", where,
                       '{"type": "function", "function": {"name": ..., "arguments": {...}}}')
        args = _as_json(fn.get("arguments") or {}, f"message {i} tool call {j} arguments", where)
        if not isinstance(args, dict):
            raise InputError(f"message {i} tool call {j} ({fn['name']}) arguments must be a JSON object", where=where)
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry = {"id": call["id"]} | entry
        out.append(entry)
    return out


def tool_result(content, i: int, where: str) -> str:
    """A `tool` message's content as text (an object or list is written as JSON, as a client would)."""
    if isinstance(content, str):
        return content
    if isinstance(content, (dict, list, int, float, bool)):
        return json.dumps(content, ensure_ascii=False)
    raise InputError(f"message {i} is a tool result without content", where=where)


def check_order(messages: list[dict], where: str) -> None:
    """Every `tool` message answers a call: it follows an assistant message with tool_calls (after
    that message's other results), and its tool_call_id, when given, is one of that message's call
    ids. An assistant message with tool_calls has no text of its own (Gemma 4's template would put
    it after the results). Raises InputError naming `where` and the message."""
    calls = None  # the tool_calls the current run of tool messages answers
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            if calls is None:
                raise InputError(f"message {i} is a tool result that does not follow an assistant tool call",
                                 where=where, hint="put each tool message right after the assistant message "
                                                   "whose tool_calls it answers")
            ids = [c["id"] for c in calls if "id" in c]
            if m.get("tool_call_id") is not None and ids and m["tool_call_id"] not in ids:
                raise InputError(f"message {i} answers tool_call_id '{m['tool_call_id']}', which the assistant "
                                 f"message before it did not make ({', '.join(ids)})", where=where)
            continue
        calls = m.get("tool_calls") or None
        if calls and m.get("content", "").strip():
            raise InputError(f"message {i} has tool_calls and text; Gemma 4's template writes that text after the "
                             "tool results", where=where,
                             hint="move the text to the assistant message after the tool results")


def has_tool_use(messages: list[dict] | None, tools: list | None = None) -> bool:
    """The conversation declares tools, calls one or carries a tool result."""
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages or [])


def read_tools_file(path) -> list[dict]:
    """The tools of a JSON file: a list of function declarations, or an object with a `tools` list
    (check_tools). Raises InputError naming the file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError("no such file", where=str(path), hint="a JSON list of tools in the OpenAI shape")
    try:
        obj = json.loads(p.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise InputError(f"is not valid JSON ({exc.msg})", where=f"{p}:{exc.lineno}") from None
    except UnicodeDecodeError:
        raise InputError("is not UTF-8 text", where=str(p)) from None
    return check_tools(obj.get("tools") if isinstance(obj, dict) and "tools" in obj else obj, str(p))


def parse_call(text: str) -> dict:
    """{"name", "arguments"} of one call's text, `call:NAME{key:value,...}` (without its markers),
    by mlx-lm's Gemma 4 tool parser; arguments is None when the text does not parse (a model that
    has not learned the format writes anything)."""
    from mlx_lm.tool_parsers import gemma4

    try:
        parsed = gemma4.parse_tool_call(text)
    except (ValueError, TypeError):
        parsed = None
    if isinstance(parsed, dict):
        return {"name": parsed["name"], "arguments": parsed["arguments"]}
    name = text.removeprefix("call:").split("{", 1)[0].strip() or "?"
    return {"name": name, "arguments": None, "text": text}


def describe(call: dict) -> str:
    """A call as a reader sees it: `get_weather(city="Paris", days=2)` (unparsed: its raw text)."""
    if call.get("arguments") is None:
        return call.get("text", call["name"])
    args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in call["arguments"].items())
    return f"{call['name']}({args})"


def calls_apart(parts: Iterable[tuple[str, str]]) -> Iterator[tuple[str, object]]:
    """Streamed ("thought" | "answer", text) pieces (thinking.thought_and_answer) with each tool call
    taken out of the answer: ("tool_call", {"name", "arguments"}) once its closing marker arrives.
    Markers split across pieces are held back until they are whole, so no marker text is yielded;
    a stray <|tool_response> (the stop token, if it ever reaches the text) is dropped."""
    buf, in_call = "", False
    for kind, piece in parts:
        if kind != "answer":
            yield kind, piece
            continue
        buf += piece
        while True:
            if in_call:
                if CALL_CLOSE not in buf:
                    break
                body, buf = buf.split(CALL_CLOSE, 1)
                yield "tool_call", parse_call(body.strip())
                in_call = False
                continue
            buf = buf.replace(RESPONSE_OPEN, "")
            if CALL_OPEN in buf:
                text, buf = buf.split(CALL_OPEN, 1)
                if text:
                    yield "answer", text
                in_call = True
                continue
            keep = max((k for m in (CALL_OPEN, RESPONSE_OPEN) for k in range(1, len(m)) if buf.endswith(m[:k])),
                       default=0)  # the start of a marker stays until it is whole
            if len(buf) > keep:
                yield "answer", buf[: len(buf) - keep]
                buf = buf[len(buf) - keep:]
            break
    if buf:
        yield ("tool_call", parse_call(buf.strip())) if in_call else ("answer", buf)


def split_calls(text: str) -> tuple[str, list[dict]]:
    """(the answer's text without calls, the calls) of a whole reply (calls_apart)."""
    answer, calls = "", []
    for kind, piece in calls_apart([("answer", text)]):
        if kind == "tool_call":
            calls.append(piece)
        else:
            answer += piece
    return answer, calls
