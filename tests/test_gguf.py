"""`export --format gguf`: llama.cpp's names, layout, types, metadata and tokenizer, read back with GGUFReader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import assert_one_line_error, run_cli

OUTTYPES = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}


@pytest.fixture(scope="module")
def hf_export(trained_run, tmp_path_factory):
    """The run's Hugging Face export in float32: the reference every GGUF tensor must equal."""
    import mlx.core as mx

    out = tmp_path_factory.mktemp("hf") / "hf"
    res = run_cli(["export", trained_run("gemma3_text"), "--format", "hf", "-o", out, "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    weights = {}
    for f in sorted(out.glob("model-*.safetensors")):
        weights.update({k: np.array(v) for k, v in mx.load(str(f)).items()})
    return out, weights


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


@pytest.mark.parametrize("outtype", list(OUTTYPES))
def test_gguf_reads_back_with_llama_cpp_layout(outtype, trained_run, hf_export, tmp_path):
    import gguf

    hf_dir, hf = hf_export
    out = tmp_path / "model.gguf"
    res = run_cli(["export", trained_run("gemma3_text"), "--format", "gguf", "-o", out, "--outtype", outtype])
    assert res.exit_code == 0, res.output
    assert f"GGUF file ({outtype})" in res.stdout
    r = gguf.GGUFReader(str(out))
    config = json.loads((hf_dir / "config.json").read_text())

    # metadata: architecture and hyperparameters
    assert _field(r, "general.architecture") == "gemma3"
    for key, want in {"block_count": config["num_hidden_layers"], "embedding_length": config["hidden_size"],
                      "feed_forward_length": config["intermediate_size"],
                      "attention.head_count": config["num_attention_heads"],
                      "attention.head_count_kv": config["num_key_value_heads"],
                      "attention.key_length": config["head_dim"], "attention.value_length": config["head_dim"],
                      "attention.sliding_window": config["sliding_window"],
                      "context_length": config["max_position_embeddings"]}.items():
        assert _field(r, f"gemma3.{key}") == want, key
    assert _field(r, "gemma3.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert _field(r, "general.file_type") == {"f16": 1, "bf16": 32, "q8_0": 7}[outtype]

    # tokenizer: every token, the special ids, the chat template
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert len(tokens) == config["vocab_size"] == len(_field(r, "tokenizer.ggml.scores"))
    for text, i in list(tok["model"]["vocab"].items()) + [(a["content"], a["id"]) for a in tok["added_tokens"]]:
        assert tokens[i] == text
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[tokens.index("<start_of_turn>")] == 3 and types[tokens.index("<0x41>")] == 6
    assert [_field(r, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")] == [
        tokens.index("<bos>"), tokens.index("<eos>"), tokens.index("<pad>")]
    assert _field(r, "tokenizer.chat_template") == (hf_dir / "chat_template.jinja").read_text()

    # tensors: every HF tensor, llama.cpp's name, shape (reversed in GGUF) and type; values after the layout
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config["num_hidden_layers"])
    by_name = {t.name: t for t in r.tensors}
    assert len(by_name) == len(hf)
    for key, want in hf.items():
        t = by_name[names.get_name(key, try_suffixes=(".weight",))]
        assert [int(d) for d in t.shape] == list(reversed(want.shape)), key
        if key.endswith("norm.weight"):
            want = want + 1.0  # Gemma's (1 + w) norm scale, stored whole for llama.cpp
        if want.ndim == 1:
            assert t.tensor_type.name == "F32"
            expected = want
        else:
            qtype = getattr(gguf.GGMLQuantizationType, OUTTYPES[outtype])
            assert t.tensor_type == qtype, key
            expected = want.astype(np.float16).astype(np.float32) if outtype == "f16" else \
                gguf.quants.dequantize(gguf.quants.quantize(want, qtype), qtype)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert np.array_equal(got.astype(np.float32), expected.astype(np.float32)), key


def test_transformers_reads_the_gguf_as_the_same_model(trained_run, hf_export, tmp_path):
    """An independent reader of llama.cpp's format (transformers' GGUF loader) gets the same logits and tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hf_dir, _ = hf_export
    out = tmp_path / "model.gguf"
    assert run_cli(["export", trained_run("gemma3_text"), "--format", "gguf", "-o", out]).exit_code == 0
    config = AutoConfig.from_pretrained(hf_dir)  # query_pre_attn_scalar etc. are not GGUF metadata
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, config=config, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    x = torch.tensor([[2, 40, 41, 60, 71, 80, 99, 120, 7, 9]])
    with torch.no_grad():
        a, b = from_gguf(x).logits, reference(x).logits
    assert float((a - b).abs().max()) < 2e-3 * float(b.abs().max())  # f16 weights
    text = "Capital of France? The quick brown fox, 42 times."
    ids = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)(text).input_ids
    assert ids == AutoTokenizer.from_pretrained(hf_dir)(text).input_ids


def test_python_api(trained_run, tmp_path):
    import mlx_gemma_tune

    result = mlx_gemma_tune.export_gguf(str(trained_run("gemma3_text")), str(tmp_path / "m.gguf"), outtype="bf16")
    assert result.format == "gguf" and result.dtype == "bf16" and result.size_bytes == (tmp_path / "m.gguf").stat().st_size


def test_ollama_modelfile_and_output_rules(trained_run, tmp_path):
    out = tmp_path / "deploy" / "tuned.gguf"
    res = run_cli(["export", trained_run("gemma3_text"), "--format", "gguf", "-o", out, "--ollama"])
    assert res.exit_code == 0, res.output
    modelfile = (out.parent / "Modelfile").read_text()
    assert "FROM ./tuned.gguf" in modelfile and 'PARAMETER stop "<end_of_turn>"' in modelfile
    assert "<start_of_turn>user" in modelfile and "<start_of_turn>model" in modelfile
    before = out.read_bytes()
    assert_one_line_error(run_cli(["export", trained_run("gemma3_text"), "--format", "gguf", "-o", out]),
                          str(out), "--force")
    assert out.read_bytes() == before
    assert_one_line_error(run_cli(["export", trained_run("gemma3_text"), "--format", "gguf", "-o", tmp_path / "m.bin"]),
                          ".gguf")
    assert_one_line_error(run_cli(["export", trained_run("gemma3_text"), "--format", "hf", "-o", tmp_path / "x",
                                   "--outtype", "q8_0"]), "--format gguf", code=2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "tuned.gguf"]  # no temporary files


@pytest.mark.parametrize("family,arch", [("gemma3n", "gemma3n"), ("gemma4_edge", "gemma4")])
def test_other_architectures_are_refused_by_name(family, arch, hf_model, tmp_path):
    res = run_cli(["export", hf_model(family), "--format", "gguf", "-o", tmp_path / "m.gguf"])
    assert_one_line_error(res, f"GGUF export of {arch}", "not implemented yet")
    assert not (tmp_path / "m.gguf").exists()
