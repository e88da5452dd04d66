"""`convert`: every fixture family converts, matches transformers, and quantizes honestly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fixtures.gemma_fixtures import FAMILIES
from helpers import assert_logits_close, assert_one_line_error, run_cli, snapshot

# A fixed token sequence: bos, then ordinary byte-level tokens.
TOKENS = [2, 40, 41, 60, 71, 80, 99, 120, 150, 200, 255, 300]


@pytest.fixture(scope="session")
def converted(hf_model, tmp_path_factory):
    """converted(family, bits=None) -> (output dir, convert summary), each converted once per session."""
    done: dict = {}

    def get(family: str, bits: int | None = None):
        if (family, bits) not in done:
            out = tmp_path_factory.mktemp("mlx") / f"{family}-{bits or 'fp32'}"
            res = run_cli(["convert", hf_model(family), "-o", out, "--json"]
                          + (["--quantize", str(bits)] if bits else []))
            assert res.exit_code == 0, res.output
            done[(family, bits)] = (out, json.loads(res.stdout))
        return done[(family, bits)]

    return get


def _hf_logits(path: Path, tokens: list[int]):
    import torch
    import transformers

    config = json.loads((path / "config.json").read_text())
    arch = config["architectures"][0]
    if arch == "Gemma3nForConditionalGeneration":
        arch = "Gemma3nForCausalLM"  # the 3n vision tower needs timm; the text model is what we compare
    model = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1].numpy()


def _mlx_logits(path: Path, tokens: list[int]):
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(path))
    cache = make_prompt_cache(model)  # the inference path: attention through a KV cache
    logits = model(mx.array([tokens]), cache=cache)[0, -1]
    return np.array(logits.astype(mx.float32))


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_conversion_matches_transformers(family, hf_model, converted):
    import numpy as np

    out, summary = converted(family)
    assert summary["dtype"] == "float32" and summary["quantization"] is None
    ref = _hf_logits(hf_model(family), TOKENS)
    got = _mlx_logits(out, TOKENS)
    assert ref.shape == got.shape and np.isfinite(got).all()
    assert_logits_close(got, ref, what=family)


@pytest.mark.parametrize("family", FAMILIES)
def test_provenance_records_source_config_and_hash(family, hf_model, converted):
    import hashlib

    out, summary = converted(family)
    prov = json.loads((out / "provenance.json").read_text())
    src = hf_model(family)
    assert prov["source"]["path"] == str(src.resolve())
    assert prov["original_config"] == json.loads((src / "config.json").read_text())
    digest = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    assert prov["source"]["files"]["model.safetensors"]["sha256"] == digest
    # What mlx-lm dropped is recorded, tower by tower, for export to restore.
    dropped = {d["component"] for d in prov["conversion"]["dropped"]}
    assert dropped == {d["component"] for d in summary["dropped"]}
    if family in ("gemma3n", "gemma4_edge"):
        assert {"vision_tower", "audio_tower"} <= dropped
    elif family == "gemma3_text":
        assert dropped == set()
    else:
        assert "vision_tower" in dropped
    # The output is an ordinary mlx-lm model directory, loadable without our tool.
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert (out / "generation_config.json").is_file()


def _quantizable(model, group_size=64):
    """(quantized, left) module paths among the layers mlx can quantize."""
    quantized, left = set(), set()
    for path, m in model.named_modules():
        if hasattr(m, "scales") and hasattr(m, "bits"):
            quantized.add(path)
        elif hasattr(m, "to_quantized") and hasattr(m, "weight"):
            left.add(path)
    return quantized, left


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_4bit_covers_every_divisible_layer(family, converted):
    import mlx.core as mx
    from mlx_lm import load

    out, summary = converted(family, 4)
    model, _ = load(str(out))
    quantized, left = _quantizable(model)
    assert quantized and len(quantized) == summary["quantized_layers"]
    # Everything left alone is reported, with its reason, and is really not divisible by 64.
    reported = {u["path"]: u["reason"] for u in summary["unquantized"]}
    assert set(reported) == left
    for path, module in model.named_modules():
        if path in left:
            assert module.weight.shape[-1] % 64 != 0, path
            assert f"input dim {module.weight.shape[-1]} not divisible by group size 64" == reported[path]
    if family == "gemma3n":
        assert any("altup" in p for p in left)  # AltUp coefficient layers have input dim 4
    # Every quantized layer is 4-bit except the MoE routers, which stay at 8-bit.
    routers = {p for p in quantized if p.endswith("router.proj")}
    assert bool(routers) == (family == "gemma4_moe")
    for path, module in model.named_modules():
        if path in quantized:
            assert module.bits == (8 if path in routers else 4), (path, module.bits)
            assert module.group_size == 64
    assert {k["path"] for k in summary["kept_at_higher_precision"]} == routers
    # And it still runs.
    logits = model(mx.array([TOKENS]))
    assert bool(mx.isfinite(logits).all())


def test_quantized_summary_lists_what_was_left_alone(hf_model, tmp_path):
    res = run_cli(["convert", hf_model("gemma3n"), "-o", tmp_path / "q", "--quantize", "4"])
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert "Gemma 3n" in text and "4-bit" in text and "Left unquantized" in text
    assert "not divisible by group size 64" in text and "altup" in text
    assert "vision_tower" in text and "audio_tower" in text  # dropped towers are named


def test_moe_summary_names_router_at_8bit(converted):
    _, summary = converted("gemma4_moe", 4)
    assert summary["kept_at_higher_precision"]
    assert all(k["bits"] == 8 and "router" in k["path"] for k in summary["kept_at_higher_precision"])


def test_8bit_and_dtype(hf_model, tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    out = tmp_path / "b8"
    res = run_cli(["convert", hf_model("gemma4_edge"), "-o", out, "-q", "8", "--dtype", "bfloat16", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["dtype"] == "bfloat16" and summary["quantization"]["bits"] == 8
    model, _ = load(str(out))
    norms = [v for k, v in __import__("mlx.utils", fromlist=["x"]).tree_flatten(model.parameters()) if "norm" in k]
    assert norms and all(v.dtype == mx.bfloat16 for v in norms)


def test_force_replaces_only_when_done(hf_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    before = snapshot(tmp_path)
    res = run_cli(["convert", hf_model("gemma3_text"), "-o", out])
    assert_one_line_error(res, "already exists", "--force")
    assert snapshot(tmp_path) == before
    res = run_cli(["convert", hf_model("gemma3_text"), "-o", out, "--force"])
    assert res.exit_code == 0, res.output
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging leftovers


def test_hub_id_from_offline_cache(hf_model, tmp_path, monkeypatch):
    """A repo id that is in the local HF cache converts offline and records id + revision."""
    hub = tmp_path / "hub"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = hub / "models--acme--tiny-gemma" / "snapshots" / rev
    shutil.copytree(hf_model("gemma3_text"), snap)
    (hub / "models--acme--tiny-gemma" / "refs").mkdir()
    (hub / "models--acme--tiny-gemma" / "refs" / "main").write_text(rev)
    out = tmp_path / "out"
    # huggingface_hub reads HF_HUB_CACHE at import; point its constant at the fake cache.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    res = run_cli(["convert", "acme/tiny-gemma", "-o", out, "--json"], env={"HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["source"] == f"acme/tiny-gemma@{rev}"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["source"]["repo_id"] == "acme/tiny-gemma" and prov["source"]["revision"] == rev


# ---- bad input: one clear line, non-zero exit, nothing written -------------------------------


def _expect_refusal(tmp_path, args, *needles, env=None, code=1):
    before = snapshot(tmp_path)
    res = run_cli(args, env=env)
    line = assert_one_line_error(res, *needles, code=code)
    assert snapshot(tmp_path) == before, "a refused convert must not write anything"
    return line


def test_missing_path(tmp_path):
    _expect_refusal(tmp_path, ["convert", tmp_path / "nope", "-o", tmp_path / "out"],
                    str(tmp_path / "nope"), "no such directory")


def test_directory_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    _expect_refusal(tmp_path, ["convert", tmp_path / "m", "-o", tmp_path / "out"], "has no config.json")


def test_non_gemma_model_type(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    line = _expect_refusal(tmp_path, ["convert", tmp_path / "m", "-o", tmp_path / "out"],
                           "config.json", "model_type 'llama'")
    assert "gemma3n" in line and "gemma4" in line  # says what is supported


def test_config_not_json(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "gemma4",\n  oops}')
    _expect_refusal(tmp_path, ["convert", tmp_path / "m", "-o", tmp_path / "out"], "config.json", "line 2")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(damage, hf_model, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(hf_model("gemma4_edge"), src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 64 + data[64:],
                         "empty": b""}[damage])
    _expect_refusal(tmp_path, ["convert", src, "-o", tmp_path / "out"], str(weights))


def test_unknown_quantize_value(hf_model, tmp_path):
    _expect_refusal(tmp_path, ["convert", hf_model("gemma3_text"), "-o", tmp_path / "out", "--quantize", "3"],
                    "--quantize", "'3'", code=2)


def test_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    _expect_refusal(tmp_path, ["convert", "google/gemma-3n-E2B-it", "-o", tmp_path / "out"],
                    "google/gemma-3n-E2B-it", "not in the local Hugging Face cache", "HF_HUB_OFFLINE",
                    env={"HF_HUB_OFFLINE": "1"})


def test_output_inside_input(hf_model, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(hf_model("gemma3_text"), src)
    _expect_refusal(tmp_path, ["convert", src, "-o", src / "mlx"], "inside the input")


def test_missing_tokenizer(hf_model, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(hf_model("gemma3_text"), src)
    (src / "tokenizer.json").unlink()
    _expect_refusal(tmp_path, ["convert", src, "-o", tmp_path / "out"], "has no tokenizer")


def test_missing_tensor(hf_model, tmp_path):
    """Weights that do not fit the architecture: mlx-lm's error, in one line."""
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "m"
    shutil.copytree(hf_model("gemma3_text"), src)
    tensors = load_file(src / "model.safetensors")
    tensors.pop(next(k for k in tensors if "q_proj" in k))
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _expect_refusal(tmp_path, ["convert", src, "-o", tmp_path / "out"], "weights do not fit a Gemma 3 model")


def test_quantization_reports_what_it_costs(hf_model, tmp_path):
    """--quantize measures itself: perplexity of source and quantized model on the built-in sample (or
    --calibration), greedy agreement, and the layers with the largest weight error; 8 bits cost less
    than 4 on every measure, and mlx-lm's mixed_4_6 recipe gives its layers their 6 bits."""
    reports = {}
    for bits, extra in (("4", []), ("8", []), ("4", ["--quant-recipe", "mixed_4_6"])):
        name = bits + "".join(extra[1:])
        res = run_cli(["convert", hf_model("gemma4_edge"), "-o", tmp_path / name, "-q", bits, *extra, "--json"])
        assert res.exit_code == 0, res.output
        reports[name] = json.loads(res.stdout)
    q4, q8, mixed = reports["4"]["quality"], reports["8"]["quality"], reports["4mixed_4_6"]["quality"]
    for q in (q4, q8, mixed):
        assert "built-in English sample" in q["text"] and q["tokens"] > 500
        assert q["perplexity_source"] > 1 and 0 < q["top1_agreement"] <= 1
        errs = [w["rel_error"] for w in q["worst_layers"]]
        assert len(errs) == 5 and errs == sorted(errs, reverse=True) and 0 < errs[-1] and errs[0] < 1
    assert q4["perplexity_source"] == q8["perplexity_source"]  # the same source, the same text
    assert abs(q8["perplexity_quantized"] / q8["perplexity_source"] - 1) < abs(
        q4["perplexity_quantized"] / q4["perplexity_source"] - 1)
    assert q8["top1_agreement"] >= q4["top1_agreement"]
    assert q8["worst_layers"][0]["rel_error"] < q4["worst_layers"][-1]["rel_error"]  # 8-bit's worst beats 4-bit's 5th
    # 4-bit affine quantization of a Gaussian-like weight: ~1/15 of each group's range per step, ~10% relative
    assert 0.03 < q4["worst_layers"][-1]["rel_error"] < 0.3
    assert reports["4mixed_4_6"]["quantization"]["recipe"] == "mixed_4_6"
    assert any(k["bits"] == 6 and k["reason"] == "mixed_4_6 recipe" for k in reports["4mixed_4_6"]["kept_at_higher_precision"])
    # a dataset file as calibration text, and the options' rules
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}."}) + "\n"
                            for i in range(3)))
    res = run_cli(["convert", hf_model("gemma4_edge"), "-o", tmp_path / "c", "-q", "4", "--calibration", rows, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["quality"]["text"].startswith("3 rows of")
    assert_one_line_error(run_cli(["convert", hf_model("gemma4_edge"), "-o", tmp_path / "d", "--quant-recipe",
                                   "mixed_4_6"]), "--quantize", code=2)
    res = run_cli(["convert", hf_model("gemma4_edge"), "-o", tmp_path / "e", "-q", "4"])
    assert "Quality cost" in res.stdout and "Worst layers" in res.stdout
