"""Dataset files: read every format users bring and normalise each row (data_check.py reports on them).

Sources (read_rows): .jsonl, .json (a list of rows or an object holding one list; JSON Lines
saved as .json is read as such), .csv (header row), .parquet, a folder written by datasets'
save_to_disk, or a Hugging Face Hub dataset id "owner/name" (its train split). read_splits
also takes a folder of train.* / valid.* / test.* files, or a DatasetDict saved to disk.

Row schemas, detected row by row:
  chat               {"messages": [{"role", "content"}]} or ShareGPT {"conversations": [{"from", "value"}]};
                     a user turn's content may be a list of text / image / audio parts (multimodal.py);
                     an assistant turn's reasoning may be its "reasoning_content" (also "thinking",
                     "reasoning") field, kept as "reasoning_content" (data.py trains or drops it);
                     tool calling in the OpenAI shape: a "tools" list on the row, assistant
                     "tool_calls", "tool" messages with the results (tools.py)
  prompt_completion  {"prompt", "completion"} (or a FAQ's {"question", "answer"}), optional "system"
  instruction        {"instruction", "context" | "input" (optional), "response" | "output"}, optional "system"
  text               {"text"}: language modelling on every token
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from mlx_gemma_tune import dataset_readers
from mlx_gemma_tune import tools as tool_calling
from mlx_gemma_tune.dataset_readers import READERS, kind_of
from mlx_gemma_tune.errors import InputError

SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "dev": "valid",
                 "test": "test"}
SCHEMAS = ("messages (or ShareGPT conversations), prompt + completion (or question + answer), instruction + "
           "response (+ context; Alpaca: instruction + input + output), text, or a preference pair: prompt (or "
           "messages) + chosen + rejected")
FIELDS = ("messages", "conversations", "prompt", "completion", "question", "answer", "instruction", "response",
          "output", "input", "context", "system", "text", "tools", "chosen", "rejected")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Row:
    where: str  # "path:line" (JSONL, CSV with the header as line 1) or "path[index]" (JSON list, Arrow)
    fmt: str  # "chat" | "prompt_completion" | "instruction" | "text" | "preference"
    messages: list[dict] | None  # [{"role": "system" | "user" | "assistant" | "tool", "content": str, ...}]
    text: str | None = None  # for fmt == "text"
    tools: list[dict] | None = None  # a chat row's function declarations (tools.check_tools)
    rejected: dict | None = None  # preference: the rejected assistant message (messages ends with the chosen one)


EXAMPLES_DIR = Path(__file__).parent / "examples"
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                "model": "assistant", "gpt": "assistant", "bot": "assistant", "tool": "tool"}


def resolve_path(path: str | Path) -> str | Path:
    """`example:NAME[/split.jsonl]` names a dataset shipped in examples/; anything else is unchanged."""
    text = str(path)
    if not text.startswith("example:"):
        return path
    target = EXAMPLES_DIR / text[len("example:"):]
    if not target.exists():
        names = sorted(d.name for d in EXAMPLES_DIR.iterdir() if d.is_dir() and not d.name.startswith("_"))
        raise InputError("is not a shipped example dataset", where=text, hint="examples: " + ", ".join(names))
    return target


def read_rows(path: str | Path) -> list[Row]:
    """The normalised rows of one dataset (file, save_to_disk folder or Hub id)."""
    path = resolve_path(path)
    p = Path(path).expanduser()
    if p.is_dir():
        if not _is_saved(p):
            sources = _split_sources(p)
            if not sources:
                raise _not_a_dataset_folder(p)
            example = next((s for split, s in sources if split == "train"), sources[0][1])
            raise InputError(f"holds several splits ({', '.join(s.name for _, s in sources)}), not one dataset",
                             where=str(p), hint=f"give one of them, e.g. {example}")
        records = dataset_readers.read_saved(p)
    elif p.is_file():
        records = dataset_readers.read_file(p)
    elif _HUB_ID.fullmatch(str(path)) and p.suffix.lower() not in READERS:
        records = dataset_readers.read_hub(str(path))
    else:
        raise InputError("no such file or folder", where=str(p),
                         hint="give a .jsonl/.json/.csv/.parquet file, a folder, or a Hub dataset id owner/name")
    rows = [_normalise(obj, where) for where, obj in records]
    if not rows:
        raise InputError("has no rows", where=str(p))
    return rows


def held_out(path: str | Path) -> str | Path:
    """The rows to evaluate on in `path`: a file (or saved Dataset, Hub id) itself; in a split folder, its
    test split, else its valid split. Raises InputError for a folder with a train split only."""
    resolved = resolve_path(path)
    p = Path(resolved).expanduser()
    sources = dict(_split_sources(p)) if p.is_dir() and not _is_saved(p) else {}
    if not sources:
        return resolved
    for split in ("test", "valid"):
        if split in sources:
            return sources[split]
    raise InputError("has no held-out split (test.* or valid.*) to evaluate on", where=str(p),
                     hint=f"give a file, e.g. {next(iter(sources.values()))}, or add test.jsonl")


def read_splits(path: str | Path) -> dict[str, list[Row]]:
    """{"train": rows, "valid": rows, "test": rows} (those present; train is required)."""
    path = resolve_path(path)
    p = Path(path).expanduser()
    sources = _split_sources(p) if p.is_dir() and not _is_saved(p) else []
    if not sources:  # a file, a saved Dataset or a Hub id is the train split
        return {"train": read_rows(path)}
    found: dict[str, Path] = {}
    for split, source in sources:
        if split in found:
            raise InputError(f"has two sources for the {split} split: {found[split].name} and {source.name}",
                             where=str(p), hint="keep one of them")
        found[split] = source
    if "train" not in found:
        raise InputError(f"has no train split (found: {', '.join(sorted(f.name for f in p.iterdir()))})",
                         where=str(p), hint="name the training data train.jsonl/.json/.csv/.parquet")
    order = ["train", "valid", "test"]
    splits = sorted(found, key=lambda s: (order.index(s) if s in order else len(order), s))
    return {s: read_rows(found[s]) for s in splits}


def _is_saved(p: Path) -> bool:
    """A folder written by Dataset.save_to_disk."""
    return (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def _split_sources(p: Path) -> list[tuple[str, Path]]:
    """(split, source) of a saved DatasetDict or of a folder of train.* / valid.* / test.* files."""
    if (p / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one saved Dataset per split
        return [(SPLIT_ALIASES.get(d.name.lower(), d.name), d) for d in sorted(p.iterdir()) if _is_saved(d)]
    return [(SPLIT_ALIASES[f.stem.lower()], f) for f in sorted(p.iterdir())
            if f.is_file() and f.stem.lower() in SPLIT_ALIASES and f.suffix.lower() in READERS]


def _not_a_dataset_folder(p: Path) -> InputError:
    names = sorted(f.name for f in p.iterdir())
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "") or "nothing"
    return InputError(f"is neither a split folder nor a save_to_disk folder (found: {shown})", where=str(p),
                      hint="a split folder holds train.jsonl/.json/.csv/.parquet (and optionally valid.*, "
                           "test.*); save_to_disk writes dataset_info.json, state.json and *.arrow")


# Normalisation

def _normalise(obj: object, where: str) -> Row:
    if not isinstance(obj, dict):
        raise InputError(f"row must be an object with named fields, not {kind_of(obj)}", where=where)
    if "chosen" in obj or "rejected" in obj:
        return _preference(obj, where)
    for key in ("messages", "conversations"):
        if key in obj:
            messages = _chat(obj[key], key, where)
            tools = tool_calling.check_tools(obj["tools"], where) if obj.get("tools") is not None else None
            tool_calling.check_order(messages, where)
            return Row(where, "chat", messages, tools=tools)
    system = _field(obj, "system", where, optional=True)
    head = [{"role": "system", "content": system}] if system else []
    for ask, reply in (("prompt", "completion"), ("question", "answer")):  # question / answer: FAQ sheets
        if ask in obj and reply in obj:
            return Row(where, "prompt_completion", head + _turn(_field(obj, ask, where), _field(obj, reply, where)))
    response = next((k for k in ("response", "output") if k in obj), None)
    if "instruction" in obj and response:
        user = _field(obj, "instruction", where)
        context = _field(obj, "context" if "context" in obj else "input", where, optional=True)
        if context.strip():
            user = f"{user}\n\n{context}"
        return Row(where, "instruction", head + _turn(user, _field(obj, response, where)))
    if "text" in obj:
        return Row(where, "text", None, _field(obj, "text", where))
    close = [f"'{k}' (did you mean '{m[0]}'?)" for k in map(str, obj)
             if k not in FIELDS and (m := difflib.get_close_matches(k.lower(), FIELDS, n=1, cutoff=0.75))]
    if close:
        raise InputError(f"row has no known schema; its field {close[0]}", where=where, hint=f"accepted: {SCHEMAS}")
    raise InputError("row has neither a known schema nor a 'text' field", where=where,
                     hint=f"accepted: {SCHEMAS}; found keys: {', '.join(map(str, obj)) or 'none'}")


PAIR_HINT = ('a pair: {"prompt": ..., "chosen": ..., "rejected": ...}, or "messages" (the context) with '
             '"chosen" and "rejected" assistant messages')


def _preference(obj: dict, where: str) -> Row:
    """A preference pair: the context (prompt text or messages, ending with the user's turn), the chosen
    answer appended to it, the rejected one apart (TRL's standard and conversational forms)."""
    for key, other in (("chosen", "rejected"), ("rejected", "chosen")):
        if key not in obj:
            raise InputError(f"preference row has '{other}' but no '{key}'", where=where, hint=PAIR_HINT)
    system = _field(obj, "system", where, optional=True)
    key = next((k for k in ("messages", "conversations", "prompt") if k in obj), None)
    if key is None:
        raise InputError("preference row has no prompt ('prompt' or 'messages')", where=where, hint=PAIR_HINT)
    if isinstance(obj[key], list):
        context = _chat(obj[key], key, where, need_answer=False)
    else:
        context = [{"role": "user", "content": _field(obj, key, where)}]
    if system and context[0]["role"] != "system":
        context.insert(0, {"role": "system", "content": system})
    if context[-1]["role"] not in ("user", "tool"):
        raise InputError(f"the prompt of a preference row must end with a user (or tool) message, not "
                         f"{context[-1]['role']}: chosen and rejected answer it", where=where)
    chosen, rejected = _answer(obj["chosen"], "chosen", where), _answer(obj["rejected"], "rejected", where)
    messages = context + [chosen]
    tools = tool_calling.check_tools(obj["tools"], where) if obj.get("tools") is not None else None
    tool_calling.check_order(messages, where)
    return Row(where, "preference", messages, tools=tools, rejected=rejected)


def _answer(value: object, key: str, where: str) -> dict:
    """A preference answer: a string, one assistant message, or a list holding one (TRL). Empty or identical
    answers are refused when the pair is encoded (data.encode_pair), so `data check` lists them all."""
    if isinstance(value, str):
        msg = {"role": "assistant", "content": value}
    else:
        msgs = _chat(value if isinstance(value, list) else [value], key, where, need_answer=False)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise InputError(f"'{key}' must be the answer: a string or one assistant message", where=where)
        msg = msgs[0]
    return msg


def _turn(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _field(obj: dict, key: str, where: str, optional: bool = False) -> str:
    value = obj.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise InputError(f"field '{key}' must be a string, not {kind_of(value)}", where=where)
    return value


def _pick(msg: dict, *keys: str):
    # the first of keys with a value (Arrow gives messages every struct field, None where absent)
    return next((msg[k] for k in keys if msg.get(k) is not None), None)


def _chat(msgs: object, key: str, where: str, need_answer: bool = True) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise InputError(f"'{key}' must be a non-empty list of messages, not {kind_of(msgs)}", where=where)
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise InputError(f"message {i} must be an object with role and content, not {kind_of(m)}", where=where)
        role, content = _pick(m, "role", "from"), _pick(m, "content", "value")
        if role is None or ("content" not in m and "value" not in m and not m.get("tool_calls")):
            raise InputError(f"message {i} needs 'role' and 'content' (ShareGPT: 'from' and 'value')", where=where,
                             hint=f"found keys: {', '.join(map(str, m)) or 'none'}")
        canonical = ROLE_ALIASES.get(str(role).strip().lower())
        if canonical is None:
            raise InputError(f"message {i} has unknown role '{role}'", where=where,
                             hint="use system, user, assistant or tool (model, human and gpt are accepted too)")
        if canonical == "tool":  # a tool's result (OpenAI shape)
            out.append({"role": "tool", "content": tool_calling.tool_result(content, i, where)}
                       | {k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)})
            continue
        calls = m.get("tool_calls") if canonical == "assistant" else None
        if calls is not None:  # a tool call; its text, if any, may be null
            calls = tool_calling.check_tool_calls(calls, i, where)
            content = "" if content is None else content
        thought = _pick(m, "reasoning_content", "thinking", "reasoning") if canonical == "assistant" else None
        if thought is not None and not isinstance(thought, str):  # the fields chat exporters use
            raise InputError(f"message {i} reasoning must be a string, not {kind_of(thought)}", where=where)
        extra = ({"reasoning_content": thought} if thought is not None else {}) | ({"tool_calls": calls} if calls else {})
        if isinstance(content, list):  # multimodal parts: text and images (paths relative to the file)
            parts = _parts(content, i, where)
            if canonical == "assistant" and any(p["type"] != "text" for p in parts):
                raise InputError(f"message {i} is an assistant turn with an image or audio; only text can be "
                                 "learned", where=where)
            out.append({"role": canonical, "content": "".join(p.get("text", "") for p in parts), "parts": parts}
                       | extra)
            continue
        if not isinstance(content, str):
            raise InputError(f"message {i} content must be a string or a list of parts, not {kind_of(content)}",
                             where=where, hint='parts: {"type": "text", "text": ...} or {"type": "image", '
                                               '"image": "path/to.png"}')
        out.append({"role": canonical, "content": content} | extra)
    if need_answer and not any(m["role"] == "assistant" for m in out):
        raise InputError("has no assistant message to learn from", where=where)
    return out


def _parts(content: list, i: int, where: str) -> list[dict]:
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image", "audio") and isinstance(part.get(kind, part.get("path")), str):
            parts.append({"type": kind, kind: part.get(kind, part.get("path"))})
        elif kind == "video":
            raise InputError(f"message {i} part {j} is a video; text, image and audio parts are supported",
                             where=where)
        else:
            raise InputError(f"message {i} part {j} must be {{\"type\": \"text\", \"text\": ...}}, "
                             f"{{\"type\": \"image\", \"image\": \"path\"}} or {{\"type\": \"audio\", "
                             f"\"audio\": \"path\"}}, not {kind_of(part)}", where=where)
    return parts


def media_of(messages: list[dict] | None, kind: str) -> list[str]:
    """The `kind` ("image" / "audio") file paths of a conversation's parts, in order (as written)."""
    return [p[kind] for m in messages or [] for p in m.get("parts", []) if p["type"] == kind]
