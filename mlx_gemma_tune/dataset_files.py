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
  prompt_completion  {"prompt", "completion"}, optional "system"
  instruction        {"instruction", "context" | "input" (optional), "response" | "output"}, optional "system"
  text               {"text"}: language modelling on every token
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlx_gemma_tune import tools as tool_calling
from mlx_gemma_tune.errors import InputError, OfflineError

READERS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "dev": "valid",
                 "test": "test"}
SCHEMAS = ("messages (or ShareGPT conversations), prompt + completion, instruction + response "
           "(+ context; Alpaca: instruction + input + output), or text")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Row:
    where: str  # "path:line" (JSONL, CSV with the header as line 1) or "path[index]" (JSON list, Arrow)
    fmt: str  # "chat" | "prompt_completion" | "instruction" | "text"
    messages: list[dict] | None  # [{"role": "system" | "user" | "assistant" | "tool", "content": str, ...}]
    text: str | None = None  # for fmt == "text"
    tools: list[dict] | None = None  # a chat row's function declarations (tools.check_tools)


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
        records = _read_saved(p)
    elif p.is_file():
        records = _read_file(p)
    elif _HUB_ID.fullmatch(str(path)) and p.suffix.lower() not in READERS:
        records = _read_hub(str(path))
    else:
        raise InputError("no such file or folder", where=str(p),
                         hint="give a .jsonl/.json/.csv/.parquet file, a folder, or a Hub dataset id owner/name")
    rows = [_normalise(obj, where) for where, obj in records]
    if not rows:
        raise InputError("has no rows", where=str(p))
    return rows


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


# Readers: each returns [(where, raw row)].

def _read_file(p: Path) -> list[tuple[str, object]]:
    kind = READERS.get(p.suffix.lower())
    if kind is None:
        raise InputError(f"has an unsupported file type '{p.suffix or '(none)'}'", where=str(p),
                         hint="supported: .jsonl, .json, .csv, .parquet, or a save_to_disk folder")
    if kind == "parquet":
        return _read_parquet(p)
    return {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[kind](p, _decode(p))


def _decode(p: Path) -> str:
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a leading BOM (Excel, Notepad) is dropped silently
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"is not UTF-8 text (bad byte at offset {exc.start})", where=f"{p}:{line}",
                         hint="re-save the file as UTF-8") from None


def _read_jsonl(p: Path, text: str) -> list[tuple[str, object]]:
    out = []
    # split on "\n" only: str.splitlines() would also break at U+2028 etc., legal inside JSON strings
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                out.append((f"{p}:{n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise _bad_json(exc, f"{p}:{n}") from None
    return out


def _bad_json(exc: json.JSONDecodeError, where: str) -> InputError:
    return InputError(f"is not valid JSON ({exc.msg} at column {exc.colno})", where=where)


def _read_json(p: Path, text: str) -> list[tuple[str, object]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(p, text)  # JSON Lines named .json (datasets' to_json writes these)
        raise _bad_json(exc, f"{p}:{exc.lineno}") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1 or lists[0] in ("messages", "conversations"):
            raise InputError("is a JSON object, not a list of rows", where=str(p),
                             hint='use [row, ...], {"data": [row, ...]} or one row per line in a .jsonl file')
        data = data[lists[0]]
    if not isinstance(data, list):
        raise InputError(f"must hold a list of rows, not {_kind(data)}", where=str(p))
    return [(f"{p}[{i}]", row) for i, row in enumerate(data)]


def _read_csv(p: Path, text: str) -> list[tuple[str, object]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    old_limit = csv.field_size_limit(2**31 - 1)  # the default (128 KiB a cell) is too small for documents
    try:
        header = [h.strip() for h in next(reader, [])]
        if not header:
            return []
        cols = set(header)
        if not ({"prompt", "completion"} <= cols or ("instruction" in cols and cols & {"response", "output"})
                or "text" in cols):
            raise InputError(f"has none of the required columns (found: {', '.join(header)})", where=f"{p}:1",
                             hint="a CSV needs prompt + completion, instruction + response (+ context), "
                                  "instruction + input + output, or text")
        out, start = [], reader.line_num + 1
        try:
            for record in reader:
                if record:  # a blank line reads as []
                    if len(record) != len(header):
                        raise InputError(f"has {len(record)} fields but the header has {len(header)}",
                                         where=f"{p}:{start}", hint="quote fields holding commas or line breaks")
                    out.append((f"{p}:{start}", dict(zip(header, record))))
                start = reader.line_num + 1  # a quoted cell may span lines: the next row starts after it
        except csv.Error as exc:
            raise InputError(f"is not valid CSV ({exc})", where=f"{p}:{start}") from None
        return out
    finally:
        csv.field_size_limit(old_limit)


def _read_parquet(p: Path) -> list[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"is not a readable Parquet file ({exc})", where=str(p)) from None
    return _columnar(str(p), table.to_pylist())


def _read_saved(p: Path) -> list[tuple[str, object]]:
    import datasets

    return _columnar(str(p), datasets.load_from_disk(str(p)).to_list())


def _columnar(name: str, rows: list[dict]) -> list[tuple[str, object]]:
    # Arrow gives every row every column; a value missing from a row comes back as None.
    return [(f"{name}[{i}]", {k: v for k, v in r.items() if v is not None}) for i, r in enumerate(rows)]


def _read_hub(repo_id: str) -> list[tuple[str, object]]:
    import datasets
    import huggingface_hub.constants as hub_constants
    from datasets.exceptions import DatasetNotFoundError

    # Both libraries read HF_HUB_OFFLINE once, at import: if it was set later, enforce it for this call.
    offline = datasets.config.HF_HUB_OFFLINE or any(os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"}
                                                    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(repo_id, split="train")
    except ConnectionError:  # includes huggingface_hub's OfflineModeIsEnabled
        if offline:
            raise OfflineError("is not a local path, nor a Hub dataset in the local cache (HF_HUB_OFFLINE is set)",
                               where=repo_id, hint="download it once online, or give a local file") from None
        raise OfflineError("could not reach the Hugging Face Hub", where=repo_id,
                           hint="check the connection, or give a local file") from None
    except (DatasetNotFoundError, FileNotFoundError):
        raise InputError("is neither a local path nor a dataset on the Hugging Face Hub", where=repo_id,
                         hint="check the spelling; a gated dataset needs `hf auth login`") from None
    except ValueError as exc:  # e.g. no "train" split
        raise InputError(f"could not be loaded as a train split ({exc})", where=repo_id) from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
    return _columnar(repo_id, ds.to_list())


# Normalisation

def _normalise(obj: object, where: str) -> Row:
    if not isinstance(obj, dict):
        raise InputError(f"row must be an object with named fields, not {_kind(obj)}", where=where)
    for key in ("messages", "conversations"):
        if key in obj:
            messages = _chat(obj[key], key, where)
            tools = tool_calling.check_tools(obj["tools"], where) if obj.get("tools") is not None else None
            tool_calling.check_order(messages, where)
            return Row(where, "chat", messages, tools=tools)
    system = _field(obj, "system", where, optional=True)
    head = [{"role": "system", "content": system}] if system else []
    if "prompt" in obj and "completion" in obj:
        return Row(where, "prompt_completion", head + _turn(_field(obj, "prompt", where),
                                                            _field(obj, "completion", where)))
    response = next((k for k in ("response", "output") if k in obj), None)
    if "instruction" in obj and response:
        user = _field(obj, "instruction", where)
        context = _field(obj, "context" if "context" in obj else "input", where, optional=True)
        if context.strip():
            user = f"{user}\n\n{context}"
        return Row(where, "instruction", head + _turn(user, _field(obj, response, where)))
    if "text" in obj:
        return Row(where, "text", None, _field(obj, "text", where))
    raise InputError("row has neither a known schema nor a 'text' field", where=where,
                     hint=f"accepted: {SCHEMAS}; found keys: {', '.join(map(str, obj)) or 'none'}")


def _turn(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _field(obj: dict, key: str, where: str, optional: bool = False) -> str:
    value = obj.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise InputError(f"field '{key}' must be a string, not {_kind(value)}", where=where)
    return value


def _pick(msg: dict, *keys: str):
    # the first of keys with a value (Arrow gives messages every struct field, None where absent)
    return next((msg[k] for k in keys if msg.get(k) is not None), None)


def _chat(msgs: object, key: str, where: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise InputError(f"'{key}' must be a non-empty list of messages, not {_kind(msgs)}", where=where)
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise InputError(f"message {i} must be an object with role and content, not {_kind(m)}", where=where)
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
            raise InputError(f"message {i} reasoning must be a string, not {_kind(thought)}", where=where)
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
            raise InputError(f"message {i} content must be a string or a list of parts, not {_kind(content)}",
                             where=where, hint='parts: {"type": "text", "text": ...} or {"type": "image", '
                                               '"image": "path/to.png"}')
        out.append({"role": canonical, "content": content} | extra)
    if not any(m["role"] == "assistant" for m in out):
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
                             f"\"audio\": \"path\"}}, not {_kind(part)}", where=where)
    return parts


def media_of(messages: list[dict] | None, kind: str) -> list[str]:
    """The `kind` ("image" / "audio") file paths of a conversation's parts, in order (as written)."""
    return [p[kind] for m in messages or [] for p in m.get("parts", []) if p["type"] == kind]


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
