"""Dataset readers: a file (JSONL, JSON, CSV, Parquet), a save_to_disk folder or a Hub dataset, each
as [(where, raw row)] with `where` the file and line (or index) for messages. dataset_files.py
normalises the rows."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from mlx_gemma_tune.errors import InputError, OfflineError

READERS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}



def read_file(p: Path) -> list[tuple[str, object]]:
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
        raise InputError(f"must hold a list of rows, not {kind_of(data)}", where=str(p))
    return [(f"{p}[{i}]", row) for i, row in enumerate(data)]


def _read_csv(p: Path, text: str) -> list[tuple[str, object]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    old_limit = csv.field_size_limit(2**31 - 1)  # the default (128 KiB a cell) is too small for documents
    try:
        header = [h.strip() for h in next(reader, [])]
        if not header:
            return []
        cols = set(header)
        if not ({"prompt", "completion"} <= cols or {"question", "answer"} <= cols
                or ("instruction" in cols and cols & {"response", "output"}) or "text" in cols):
            raise InputError(f"has none of the required columns (found: {', '.join(header)})", where=f"{p}:1",
                             hint="a CSV needs prompt + completion, question + answer, instruction + response "
                                  "(+ context), instruction + input + output, or text")
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


def read_saved(p: Path) -> list[tuple[str, object]]:
    import datasets

    return _columnar(str(p), datasets.load_from_disk(str(p)).to_list())


def _columnar(name: str, rows: list[dict]) -> list[tuple[str, object]]:
    # Arrow gives every row every column; a value missing from a row comes back as None.
    return [(f"{name}[{i}]", {k: v for k, v in r.items() if v is not None}) for i, r in enumerate(rows)]


def read_hub(repo_id: str) -> list[tuple[str, object]]:
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


def kind_of(value: object) -> str:
    """How a JSON value is named in messages: "an object", "a list", "a string", "null", ..."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
