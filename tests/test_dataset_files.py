"""dataset_files: every dataset format, row normalisation, bad-input messages, the check report."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest

from mlx_gemma_tune.data_check import check_dataset
from mlx_gemma_tune.dataset_files import read_rows, read_splits
from mlx_gemma_tune.errors import InputError, OfflineError

SYS = {"role": "system", "content": "Be brief."}


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows, prefix: str = "") -> Path:
    path.write_text(prefix + "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def write_csv(path: Path, header, rows, bom: bool = False) -> Path:
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_parquet(path: Path, rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def save_dataset(path: Path, rows) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def error_of(fn, *args) -> str:
    with pytest.raises(InputError) as err:
        fn(*args)
    line = err.value.one_line()
    assert "\n" not in line
    return line


# Formats and normalisation

def test_jsonl_every_schema_normalised(tmp_path):
    p = write_jsonl(tmp_path / "mix.jsonl", [
        {"messages": [SYS, {"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        "",  # blank lines are skipped but still counted
        {"prompt": "2+2?", "completion": "4", "system": "Be brief."},
        {"instruction": "Summarise", "context": "Long text.", "response": "Short.", "category": "summarization"},
        {"instruction": "Name a colour", "context": "", "response": "Red"},
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"text": "Plain text."},
    ])
    rows = read_rows(p)
    assert [r.where for r in rows] == [f"{p}:{n}" for n in (1, 2, 4, 5, 6, 7, 8)]
    assert [r.fmt for r in rows] == ["chat", "chat", "prompt_completion", "instruction", "instruction",
                                     "instruction", "text"]
    assert rows[0].messages == [SYS, user("Hi"), bot("Hello")]
    assert rows[1].messages == [user("Q"), bot("A")]
    assert rows[2].messages == [SYS, user("2+2?"), bot("4")]
    assert rows[3].messages == [user("Summarise\n\nLong text."), bot("Short.")]
    assert rows[4].messages == [user("Name a colour"), bot("Red")]
    assert rows[5].messages == [user("Translate\n\nchat"), bot("cat")]
    assert rows[6].messages is None and rows[6].text == "Plain text."
    assert all(r.text is None for r in rows[:6])


def test_jsonl_bom_crlf_and_line_separator_inside_strings(tmp_path):
    p = tmp_path / "bom.jsonl"
    rows = [{"prompt": "a\u2028b", "completion": "c"}, {"text": "t"}]
    p.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode())
    got = read_rows(p)
    assert [r.where for r in got] == [f"{p}:1", f"{p}:2"]
    assert got[0].messages == [user("a\u2028b"), bot("c")]


def test_json_list_data_object_and_json_lines_named_json(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}, {"text": "t"}]
    a = tmp_path / "list.json"
    a.write_text(json.dumps(rows, indent=2))
    b = tmp_path / "obj.json"
    b.write_text(json.dumps({"version": 1, "data": rows}))
    c = write_jsonl(tmp_path / "lines.json", rows)
    for p in (a, b):
        got = read_rows(p)
        assert [r.where for r in got] == [f"{p}[0]", f"{p}[1]"]
        assert [r.fmt for r in got] == ["prompt_completion", "text"]
        assert got[0].messages == [user("p"), bot("c")]
    assert [r.where for r in read_rows(c)] == [f"{c}:1", f"{c}:2"]


def test_csv_dolly_columns_with_bom_multiline_cells_and_empty_fields(tmp_path):
    p = write_csv(tmp_path / "dolly.csv", ["instruction", "context", "response", "category"], [
        ["What is X?", "X is a letter.", "A letter.", "closed_qa"],
        ["Write a poem", "", "Roses\nare red", "creative_writing"],  # spans lines 3-4
        ["Empty answer", "", "", "open_qa"],
    ], bom=True)
    rows = read_rows(p)
    assert [r.where for r in rows] == [f"{p}:2", f"{p}:3", f"{p}:5"]
    assert rows[0].messages == [user("What is X?\n\nX is a letter."), bot("A letter.")]
    assert rows[1].messages == [user("Write a poem"), bot("Roses\nare red")]
    assert rows[2].messages == [user("Empty answer"), bot("")]  # still a row; check_dataset reports it
    assert {r.fmt for r in rows} == {"instruction"}


def test_csv_prompt_completion_with_system_and_text(tmp_path):
    p = write_csv(tmp_path / "pc.csv", ["system", "prompt", "completion"], [["", "p1", "c1"], ["S", "p2", "c2"]])
    rows = read_rows(p)
    assert rows[0].messages == [user("p1"), bot("c1")]  # an empty system cell means no system message
    assert rows[1].messages == [{"role": "system", "content": "S"}, user("p2"), bot("c2")]
    t = write_csv(tmp_path / "t.csv", ["text"], [["hello"]])
    assert read_rows(t)[0].text == "hello"


def test_parquet_mixed_schemas(tmp_path):
    p = write_parquet(tmp_path / "d.parquet", [
        {"prompt": "p", "completion": "c", "text": None, "messages": None},
        {"prompt": None, "completion": None, "text": "t", "messages": None},
        {"prompt": None, "completion": None, "text": None,
         "messages": [user("u"), {"role": "model", "content": "m"}]},
    ])
    rows = read_rows(p)
    assert [r.where for r in rows] == [f"{p}[0]", f"{p}[1]", f"{p}[2]"]
    assert [r.fmt for r in rows] == ["prompt_completion", "text", "chat"]
    assert rows[0].messages == [user("p"), bot("c")]
    assert rows[2].messages == [user("u"), bot("m")]


def test_save_to_disk_dataset_and_sharegpt_struct_fields(tmp_path):
    d = save_dataset(tmp_path / "saved", [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q2"},
                           {"from": "gpt", "value": "a2"}]},
    ])
    rows = read_rows(d)
    assert [r.where for r in rows] == [f"{d}[0]", f"{d}[1]"]
    assert rows[1].messages == [{"role": "system", "content": "s"}, user("q2"), bot("a2")]
    assert read_splits(d) == {"train": rows}


def test_saved_dataset_dict_maps_validation_to_valid(tmp_path):
    import datasets

    root = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}] * 2),
        "validation": datasets.Dataset.from_list([{"text": "v"}]),
    }).save_to_disk(str(root))
    splits = read_splits(root)
    assert list(splits) == ["train", "valid"]
    assert [r.where for r in splits["train"]] == [f"{root / 'train'}[0]", f"{root / 'train'}[1]"]
    assert splits["valid"][0].text == "v"
    line = error_of(read_rows, root)
    assert "holds several splits (train, validation)" in line and f"e.g. {root / 'train'})" in line


def test_split_folder_with_mixed_file_formats(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "completion": "c"}])
    write_csv(tmp_path / "valid.csv", ["instruction", "context", "response"], [["i", "ctx", "r"]])
    write_parquet(tmp_path / "test.parquet", [{"text": "t"}])
    (tmp_path / "README.md").write_text("ignored")
    splits = read_splits(tmp_path)
    assert list(splits) == ["train", "valid", "test"]
    assert splits["train"][0].where == f"{tmp_path / 'train.jsonl'}:1"
    assert splits["valid"][0].where == f"{tmp_path / 'valid.csv'}:2"
    assert splits["valid"][0].messages == [user("i\n\nctx"), bot("r")]
    assert splits["test"][0].where == f"{tmp_path / 'test.parquet'}[0]"
    line = error_of(read_rows, tmp_path)
    assert "holds several splits (test.parquet, train.jsonl, valid.csv)" in line
    assert f"e.g. {tmp_path / 'train.jsonl'}" in line


@pytest.mark.parametrize("name", ["validation.json", "val.jsonl", "dev.csv"])
def test_split_folder_valid_aliases(tmp_path, name):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    v = tmp_path / name
    if name.endswith(".csv"):
        write_csv(v, ["text"], [["b"]])
    elif name.endswith(".json"):
        v.write_text(json.dumps([{"text": "b"}]))
    else:
        write_jsonl(v, [{"text": "b"}])
    assert {k: [r.text for r in v] for k, v in read_splits(tmp_path).items()} == {"train": ["a"], "valid": ["b"]}


def test_split_folder_errors(tmp_path):
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "a"}])
    (tmp_path / "notes.txt").write_text("x")
    line = error_of(read_splits, tmp_path)
    assert "no train split" in line and "valid.jsonl" in line and "notes.txt" in line
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "a"}])
    line = error_of(read_splits, tmp_path)
    assert "two sources for the valid split" in line and "dev.jsonl" in line and "valid.jsonl" in line


def test_single_file_is_the_train_split(tmp_path):
    p = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}])
    assert list(read_splits(p)) == ["train"]


# Bad input: one clear error naming the file and the line or index

BAD_ROWS = [
    ('{"text": "ok"}\n{"text": oops}', ":2", "not valid JSON", "column 10"),  # raw file text
    ([{"text": "ok"}, ["a", "list"]], ":2", "must be an object", "a list"),
    ([{"messages": [user("hi"), {"role": "robot", "content": "x"}]}], ":1", "message 1", "unknown role 'robot'"),
    ([{"messages": [user("hi"), {"role": "assistant", "content": 5}]}], ":1", "message 1 content", "not a number"),
    ([{"messages": [user("hi"), {"role": "assistant", "content": [{"type": "text"}]}]}], ":1", "message 1 part 0",
     '"type": "image"'),
    ([{"messages": [user("hi"), {"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}]}], ":1",
     "assistant turn with an image", "bad.jsonl"),
    ([{"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]}, {"role": "assistant",
                                                                                       "content": "x"}]}],
     ":1", "is a video", "image and audio"),
    ([{"messages": [user("hi")]}], ":1", "no assistant message", "bad.jsonl"),
    ([{"messages": [{"content": "x"}]}], ":1", "message 0 needs 'role'", "found keys: content"),
    ([{"messages": []}], ":1", "non-empty list", "bad.jsonl"),
    ([{"query": "q", "reply": "a"}], ":1", "neither a known schema", "found keys: query, reply"),
    ([{"prompt": "p", "completion": None}], ":1", "field 'completion' must be a string", "null"),
    ([{"instruction": "i", "response": 3}], ":1", "field 'response'", "a number"),
    ([{"prompt": "p", "completion": "c", "system": ["x"]}], ":1", "field 'system'", "a list"),
]


@pytest.mark.parametrize("content,loc,needle1,needle2", BAD_ROWS)
def test_bad_jsonl_rows(tmp_path, content, loc, needle1, needle2):
    p = tmp_path / "bad.jsonl"
    if isinstance(content, str):
        p.write_text(content)
    else:
        write_jsonl(p, content)
    line = error_of(read_rows, p)
    assert f"bad.jsonl{loc}" in line
    for needle in (needle1, needle2):
        assert needle in line, (needle, line)


def test_unknown_schema_hint_lists_accepted_schemas(tmp_path):
    line = error_of(read_rows, write_jsonl(tmp_path / "x.jsonl", [{"q": 1}]))
    for needle in ("messages", "prompt + completion", "instruction + response", "text", "found keys: q"):
        assert needle in line


def test_non_utf8_names_line_and_says_resave(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    line = error_of(read_rows, p)
    assert "latin1.jsonl:2" in line and "UTF-8" in line and "re-save" in line
    c = tmp_path / "latin1.csv"
    c.write_bytes(b"text\ncaf\xe9\n")
    assert "latin1.csv:2" in error_of(read_rows, c)


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]"),
                                          ("header.csv", "text\n"), ("nothing.csv", "")])
def test_empty_dataset(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    assert error_of(read_rows, p) == f"{p}: has no rows"


def test_bad_json_files(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    line = error_of(read_rows, p)
    assert "broken.json:3" in line and "not valid JSON" in line and "column" in line
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"messages": [user("u"), bot("b")]}))
    assert "not a list of rows" in error_of(read_rows, one)
    scalar = tmp_path / "scalar.json"
    scalar.write_text('"just a string"')
    assert "must hold a list of rows, not a string" in error_of(read_rows, scalar)
    nonobj = tmp_path / "nonobj.json"
    nonobj.write_text('[{"text": "a"}, 3]')
    assert f"{nonobj}[1]: row must be an object" in error_of(read_rows, nonobj)


def test_bad_csv_files(tmp_path):
    p = write_csv(tmp_path / "cols.csv", ["query", "reply"], [["q", "a"]])
    line = error_of(read_rows, p)
    assert "cols.csv:1" in line and "required columns" in line and "query, reply" in line
    p = write_csv(tmp_path / "half.csv", ["instruction", "context"], [["q", "a"]])  # no response column
    assert "half.csv:1" in error_of(read_rows, p)
    p = tmp_path / "fields.csv"
    p.write_text("prompt,completion\np,c\np,c,extra\n")
    line = error_of(read_rows, p)
    assert "fields.csv:3" in line and "3 fields but the header has 2" in line


def test_bad_paths_and_folders(tmp_path):
    txt = tmp_path / "data.txt"
    txt.write_text("hi")
    line = error_of(read_rows, txt)
    assert "data.txt" in line and ".txt" in line and ".jsonl, .json, .csv, .parquet" in line
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "data.jsonl").write_text('{"text": "a"}\n')
    for fn in (read_rows, read_splits):
        line = error_of(fn, folder)
        assert "neither a split folder nor a save_to_disk folder" in line and "data.jsonl" in line
    assert "no such file" in error_of(read_rows, tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    assert "bad.parquet: is not a readable Parquet file" in error_of(read_rows, bad)


def test_relative_missing_file_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert error_of(read_rows, "data/train.jsonl").startswith("data/train.jsonl: no such file")


# Hugging Face Hub ids (never the network)

@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_hub_id_offline_and_not_cached(no_network):
    with pytest.raises(OfflineError) as err:
        read_rows("someone/not-cached-dataset")
    line = err.value.one_line()
    assert line.startswith("someone/not-cached-dataset: ") and "HF_HUB_OFFLINE" in line and "local file" in line
    assert no_network == []


def test_hub_offline_is_honoured_when_set_after_import(no_network, monkeypatch):
    import datasets
    import huggingface_hub.constants as hub_constants

    # as if datasets and huggingface_hub had been imported before HF_HUB_OFFLINE=1 was set
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError):
        read_rows("someone/other-dataset")
    assert no_network == []
    assert datasets.config.HF_HUB_OFFLINE is False and hub_constants.HF_HUB_OFFLINE is False  # restored


def test_hub_id_loads_train_split(monkeypatch, no_network):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"instruction": "i", "context": None, "response": "r"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = read_splits("owner/name")["train"]
    assert calls == [("owner/name", "train")]
    assert rows[0].where == "owner/name[0]" and rows[0].messages == [user("i"), bot("r")]


# check_dataset

def _report_dataset(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [
        {"messages": [user("Hi"), bot("Hello there")]},
        {"prompt": "Hi", "completion": "Hello there"},  # same normalised content as line 1
        {"text": "Some plain text to model."},
        {"instruction": "Say nothing", "response": ""},  # empty field
        {"messages": [SYS, user("Tell me a long story"), bot("Once upon a time " * 20)]},
    ])
    write_csv(tmp_path / "valid.csv", ["prompt", "completion"], [["Hi", "Hello there"], ["", "x"]])
    return tmp_path


def test_check_dataset_without_tokenizer(tmp_path):
    rep = check_dataset(_report_dataset(tmp_path), max_seq_length=10)
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.csv"
    assert rep.splits == {"train": 5, "valid": 2}
    assert rep.formats == {"prompt_completion": 3, "chat": 2, "instruction": 1, "text": 1}
    assert rep.length_unit == "characters" and rep.too_long is None
    assert rep.lengths["min"] == 1 and rep.lengths["max"] == len("Be brief.Tell me a long story") + 17 * 20
    assert rep.duplicates == 2
    assert rep.duplicates_at == [f"{train}:2 (same as {train}:1)", f"{valid}:2 (same as {train}:1)"]
    assert rep.empty == 2 and rep.empty_at == [f"{train}:4", f"{valid}:3"]
    json.dumps(rep.to_dict())


@pytest.fixture(scope="module", params=["gemma3n", "gemma4_edge"])
def tokenizer(hf_model, request):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(hf_model(request.param))


def test_check_dataset_token_lengths_match_training(tmp_path, tokenizer):
    from mlx_gemma_tune.data import encode_chat, encode_row

    root = _report_dataset(tmp_path)
    rows = [r for split in read_splits(root).values() for r in split]
    hf = tokenizer._tokenizer
    expected = [max(len(e.tokens) for e in encode_row(tokenizer, r)) for r in rows]  # what training encodes
    for r, n in zip(rows, expected):
        if r.messages is not None:
            assert n == len(encode_chat(tokenizer, r.messages, r.where).tokens)
        else:  # language modelling: bos + text + eos
            assert n == len(hf(r.text, add_special_tokens=False)["input_ids"]) + 2
    limit = max(expected) - 1  # only the long story is over
    rep = check_dataset(root, tokenizer=tokenizer, max_seq_length=limit)
    assert rep.length_unit == "tokens"
    assert rep.lengths["min"] == min(expected) and rep.lengths["max"] == max(expected)
    assert rep.lengths["mean"] == round(sum(expected) / len(expected), 1)
    assert rep.lengths["p50"] == sorted(expected)[3]
    assert rep.too_long == 1 and rep.too_long_at == [f"{root / 'train.jsonl'}:5"]
    assert rep.to_dict()["too_long"] == 1
    # a transformers tokenizer gives the same report as mlx-lm's wrapper
    rep = check_dataset(root, tokenizer=hf, max_seq_length=min(expected) - 1)
    assert rep.too_long == 7 and rep.too_long_at == [f"{root / 'train.jsonl'}:{n}" for n in (1, 2, 3)]
    assert rep.lengths["max"] == max(expected)


def test_a_faq_sheet_of_questions_and_answers_is_prompt_completion(tmp_path):
    """The most common FAQ layout, question,answer columns (CSV or JSONL), trains as prompt / completion."""
    from mlx_gemma_tune import dataset_files

    sheet = write_csv(tmp_path / "faq.csv", ["question", "answer"], [["How do I reset my password?", "Use 'Forgot'."]])
    [row] = dataset_files.read_rows(sheet)
    assert row.fmt == "prompt_completion" and row.where == f"{sheet}:2"
    assert row.messages == [{"role": "user", "content": "How do I reset my password?"},
                            {"role": "assistant", "content": "Use 'Forgot'."}]
    rows = tmp_path / "faq.jsonl"
    rows.write_text('{"question": "Q?", "answer": "A.", "system": "Be brief."}\n')
    [row] = dataset_files.read_rows(rows)
    assert [m["role"] for m in row.messages] == ["system", "user", "assistant"]


def test_eval_on_a_split_folder_uses_its_held_out_split(tmp_path):
    from mlx_gemma_tune import dataset_files

    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"{split}.jsonl").write_text('{"prompt": "Q", "completion": "A"}\n')
    assert dataset_files.held_out(folder) == folder / "test.jsonl"
    (folder / "test.jsonl").unlink()
    assert dataset_files.held_out(folder) == folder / "valid.jsonl"
    assert dataset_files.held_out(folder / "train.jsonl") == folder / "train.jsonl"
