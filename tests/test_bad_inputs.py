"""The bad-input corpus (tests/bad_inputs/): every broken input gets one clear line and changes nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import assert_one_line_error, run_cli, snapshot

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())


def _setup(ws: Path, steps: list[dict], hf: Path, run: Path) -> None:
    for step in steps:
        (op, arg), = step.items()
        if op == "copy_model":
            shutil.copytree(hf, ws / arg)
        elif op == "copy_run":
            shutil.copytree(run, ws / arg)
        elif op == "json_set":
            path, key, value = ws / arg[0], arg[1], arg[2]
            cfg = json.loads(path.read_text())
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
            path.write_text(json.dumps(cfg))
        elif op == "truncate":
            path = ws / arg[0]
            path.write_bytes(path.read_bytes()[: arg[1]])
        elif op == "rename":
            (ws / arg[0]).rename(ws / arg[1])
        elif op == "delete":
            (ws / arg).unlink()
        elif op == "write":
            (ws / arg[0]).write_text(arg[1])
        elif op == "mkdir":
            (ws / arg).mkdir(parents=True)
        else:
            raise AssertionError(f"unknown setup step {op}")


def test_the_corpus_is_large_and_well_formed():
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    assert all(c["expect"] for c in CASES), "every case names what the message must point at"
    used = {Path(a.split("{files}/", 1)[1]).parts[0] for c in CASES for a in c["args"] if "{files}/" in a}
    assert used == {p.name for p in (CORPUS / "files").iterdir()}, "every corpus file is used, none is missing"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input(case, hf_model, trained_run, tmp_path, monkeypatch):
    hf, hf4, run = hf_model("gemma3_text"), hf_model("gemma4_edge"), trained_run("gemma3_text")
    ws = tmp_path / "ws"
    shutil.copytree(CORPUS / "files", ws / "files")
    _setup(ws, case.get("setup", []), hf, run)
    values = {"files": ws / "files", "ws": ws, "hf": hf, "hf4": hf4, "run": run, "model": ws / "model"}
    args = [a.format(**values) for a in case["args"]]
    cache = Path(os.environ["MLX_GEMMA_TUNE_CACHE"])
    watched = {"workspace": ws, "base": hf, "base4": hf4, "run": run, "cache": cache}
    before = {name: snapshot(p, quick=True) for name, p in watched.items()}

    result = run_cli(args)

    line = assert_one_line_error(result, *case["expect"])
    assert "internal error" not in line, line
    for name, p in watched.items():
        assert snapshot(p, quick=True) == before[name], f"{case['id']} changed files in {name}"
