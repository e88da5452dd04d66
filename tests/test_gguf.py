"""`export --format gguf`: llama.cpp's names, layout, types, metadata and tokenizer, read back with GGUFReader."""

from __future__ import annotations

import json
import shutil

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


def test_multimodal_gemma3_is_refused_by_name(hf_model, tmp_path):
    src = tmp_path / "gemma3-mm"
    shutil.copytree(hf_model("gemma3_text"), src)
    text = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text,
                                                 "architectures": ["Gemma3ForConditionalGeneration"]}))
    res = run_cli(["export", src, "--format", "gguf", "-o", tmp_path / "m.gguf"])
    assert_one_line_error(res, "multimodal Gemma 3", "Gemma3ForConditionalGeneration")
    assert not (tmp_path / "m.gguf").exists()


# ---- Gemma 3n and Gemma 4 -------------------------------------------------------------------

ROWS = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(8)]


@pytest.fixture(scope="module")
def family_exports(hf_model, tmp_path_factory):
    """family_exports(family, outtype) -> (HF export dir, its float32 tensors, the GGUF path) of a short run."""
    import mlx.core as mx

    from mlx_gemma_tune import prepare, trainer

    done = {}

    def get(family, outtype="f16"):
        if family not in done:
            root = tmp_path_factory.mktemp(f"gguf-{family}")
            data = root / "d.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
            sets = ("train.lr=1e-2", "lora.rank=4", "lora.dropout=0.0", "train.iters=4", "data.valid_fraction=0")
            trainer.run(prepare.prepare_run(model=str(hf_model(family)), data=str(data), out=str(root / "run"),
                                            sets=sets))
            res = run_cli(["export", root / "run", "--format", "hf", "-o", root / "hf", "--dtype", "float32"])
            assert res.exit_code == 0, res.output
            weights = {}
            for f in sorted((root / "hf").glob("model*.safetensors")):
                weights.update({k: np.array(v) for k, v in mx.load(str(f)).items()})
            done[family] = (root, weights)
        root, weights = done[family]
        out = root / f"{outtype}.gguf"
        if not out.exists():
            res = run_cli(["export", root / "run", "--format", "gguf", "-o", out, "--outtype", outtype])
            assert res.exit_code == 0, res.output
        return root / "hf", weights, out

    return get


def _expected_tensors(family: str, hf: dict, config: dict) -> dict:
    """llama.cpp's name -> (HF tensors it is built from, the float32 values it must hold): the layout
    convert_hf_to_gguf.py writes for Gemma 3n / Gemma 4 (no +1 on norms, as these RMSNorms scale by w)."""
    import gguf

    text = config["text_config"]
    arch = gguf.MODEL_ARCH.GEMMA3N if family == "gemma3n" else gguf.MODEL_ARCH.GEMMA4
    names = gguf.get_tensor_name_map(arch, text["num_hidden_layers"])
    lm = {k.replace("model.language_model.", "model."): v for k, v in hf.items() if k.startswith("model.language_model.")}
    out = {}
    for key, value in lm.items():
        if ".altup_projections." in key or ".altup_unembed_projections." in key:
            continue
        if key.endswith(("router.scale", "router.per_expert_scale")):
            block = key.split(".")[2]
            name = f"blk.{block}.ffn_gate_inp.scale" if key.endswith("router.scale") else f"blk.{block}.ffn_down_exps.scale"
            out[name] = ([key], value)
            continue
        name = names.get_name(key, try_suffixes=(".weight",))
        if not name.endswith(".weight"):  # scales and expert tensors get the .weight suffix
            name += ".weight"
        if "embed_tokens" in key and len(value) < text["vocab_size"]:  # image / audio ids: zero rows
            value = np.concatenate([value, np.zeros((text["vocab_size"] - len(value), value.shape[1]), value.dtype)])
        out[name] = ([key], value)
    if family == "gemma3n":
        for hf_name, name in (("altup_projections", "altup_proj.weight"),
                              ("altup_unembed_projections", "altup_unembd_proj.weight")):
            keys = [f"model.{hf_name}.{i}.weight" for i in range(3)]
            out[name] = (keys, np.stack([lm[k] for k in keys]))
    else:
        rotated = int(text["global_head_dim"] * text["rope_parameters"]["full_attention"]["partial_rotary_factor"] / 2)
        out["rope_freqs.weight"] = ([], np.array([1.0] * rotated + [1e30] * (text["global_head_dim"] // 2 - rotated),
                                                 dtype=np.float32))
    return out


@pytest.mark.parametrize("family,outtype", [("gemma3n", "f16"), ("gemma4_edge", "f16"), ("gemma4_dense", "bf16"),
                                            ("gemma4_moe", "q8_0")])
def test_gemma3n_and_gemma4_read_back_in_llama_cpp_layout(family, outtype, family_exports):
    import gguf

    hf_dir, hf, path = family_exports(family, outtype)
    config = json.loads((hf_dir / "config.json").read_text())
    text = config["text_config"]
    arch = "gemma3n" if family == "gemma3n" else "gemma4"
    r = gguf.GGUFReader(str(path))
    assert _field(r, "general.architecture") == arch

    # tensors: names, reversed shapes, types and values; every language-model tensor used exactly once
    expected = _expected_tensors(family, hf, config)
    by_name = {t.name: t for t in r.tensors}
    assert sorted(by_name) == sorted(expected)
    used = sorted(k for keys, _ in expected.values() for k in keys)
    assert used == sorted(k.replace("model.language_model.", "model.") for k in hf if k.startswith("model.language_model."))
    f32 = ("_norm.weight", ".scale", "ffn_gate_inp.weight", "altup_correct_coef.weight", "altup_predict_coef.weight")
    qtype = getattr(gguf.GGMLQuantizationType, OUTTYPES[outtype])
    for name, (keys, want) in expected.items():
        t = by_name[name]
        assert [int(d) for d in t.shape] == list(reversed(want.shape)), name
        if want.ndim <= 1 or name.endswith(f32):
            assert t.tensor_type.name == "F32", name
            expected_values = want
        else:
            assert t.tensor_type == qtype, name
            expected_values = want.astype(np.float16).astype(np.float32) if outtype == "f16" else \
                gguf.quants.dequantize(gguf.quants.quantize(want, qtype), qtype)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert np.array_equal(got.astype(np.float32), expected_values.astype(np.float32)), name

    # hyperparameters llama.cpp reads for the architecture
    n = text["num_hidden_layers"]
    swa = [t == "sliding_attention" for t in text["layer_types"]]
    meta = {k.split(".", 1)[1]: f.contents() for k, f in r.fields.items() if k.startswith(arch + ".")}
    assert meta["block_count"] == n and meta["embedding_length"] == text["hidden_size"]
    assert meta["attention.sliding_window_pattern"] == swa
    assert meta["attention.shared_kv_layers"] == text["num_kv_shared_layers"]
    assert meta["embedding_length_per_layer_input"] == (text["hidden_size_per_layer_input"] or 0)
    assert meta["final_logit_softcapping"] == pytest.approx(text["final_logit_softcapping"])
    assert meta["rope.freq_base"] == pytest.approx(1e6) and meta["rope.freq_base_swa"] == pytest.approx(1e4)
    if family == "gemma3n":
        assert meta["feed_forward_length"] == text["intermediate_size"]  # one per layer
        assert meta["altup.num_inputs"] == 4 and meta["altup.active_idx"] == 0
        assert meta["attention.key_length"] == text["head_dim"]
        # 0.95 sparsity -> keep activations above mean + 1.645 std; no sparsity -> -inf (nothing cut)
        assert meta["activation_sparsity_scale"] == pytest.approx([1.6448536, 1.6448536, -np.inf, -np.inf])
    else:
        assert (meta["attention.key_length"], meta["attention.key_length_swa"]) == (text["global_head_dim"], text["head_dim"])
        assert (meta["rope.dimension_count"], meta["rope.dimension_count_swa"]) == (text["global_head_dim"],
                                                                                  text["head_dim"])
        shared = text["num_kv_shared_layers"]
        ffn = text["intermediate_size"]
        assert meta["feed_forward_length"] == ([ffn * (2 if i >= n - shared else 1) for i in range(n)]
                                               if text["use_double_wide_mlp"] else ffn)
        kv = text["num_key_value_heads"]
        assert meta["attention.head_count_kv"] == (
            [kv if s else text["num_global_key_value_heads"] for s in swa] if text["num_global_key_value_heads"] else kv)
        if text["enable_moe_block"]:
            assert (meta["expert_count"], meta["expert_used_count"], meta["expert_feed_forward_length"]) == (
                text["num_experts"], text["top_k_experts"], text["moe_intermediate_size"])

    # tokenizer
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == text["vocab_size"]
    for t, i in tok["model"]["vocab"].items():
        assert tokens[i] == t
    types = _field(r, "tokenizer.ggml.token_type")
    assert _field(r, "tokenizer.chat_template") == (hf_dir / "chat_template.jinja").read_text()
    assert _field(r, "tokenizer.ggml.bos_token_id") == tokens.index("<bos>")
    if family == "gemma3n":
        assert _field(r, "tokenizer.ggml.model") == "llama"
        assert types[tokens.index("<start_of_turn>")] == 3
    else:  # llama.cpp's Gemma 4 BPE: the merges themselves, control turn markers, always-visible channel markers
        assert _field(r, "tokenizer.ggml.model") == "gemma4"
        merges = _field(r, "tokenizer.ggml.merges")
        assert merges == [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
        assert set(_field(r, "tokenizer.ggml.scores")) == {-1000.0}
        assert types[tokens.index("<|turn>")] == 3 and types[tokens.index("<|channel>")] == 4
        assert _field(r, "tokenizer.ggml.add_bos_token") is True


@pytest.mark.parametrize("family,stop", [("gemma3n", "<end_of_turn>"), ("gemma4_edge", "<turn|>")])
def test_ollama_modelfile_uses_the_family_turns(family, stop, family_exports, tmp_path):
    hf_dir, _, _ = family_exports(family)
    out = tmp_path / "m.gguf"
    res = run_cli(["export", hf_dir.parent / "run", "--format", "gguf", "-o", out, "--ollama"])
    assert res.exit_code == 0, res.output
    modelfile = (tmp_path / "Modelfile").read_text()
    assert f'PARAMETER stop "{stop}"' in modelfile
    assert ("<|turn>user" in modelfile) == (family != "gemma3n")


# ---- GGUF LoRA adapters and llama.cpp quantizations without the extra ----------------------------


def test_gguf_lora_adapter_layout_and_values(trained_run, hf_export, hf_model, tmp_path):
    """The adapter GGUF in convert_lora_to_gguf.py's layout: general.type adapter, adapter.type lora,
    adapter.lora.alpha; per adapted base tensor X (named as in the base GGUF), X.lora_a (rank, in) and
    X.lora_b (out, rank), with alpha / rank * B @ A equal to what merging changed in the run's weights."""
    import gguf
    import mlx.core as mx

    from mlx_gemma_tune import gguf_export

    run = trained_run("gemma3_text")
    out = tmp_path / "ollama" / "adapter.gguf"
    res = run_cli(["export", run, "--format", "gguf-lora", "-o", out, "--ollama"])
    assert res.exit_code == 0, res.output
    assert "GGUF LoRA adapter" in res.stdout
    r = gguf.GGUFReader(str(out))
    assert _field(r, "general.type") == "adapter" and _field(r, "adapter.type") == "lora"
    assert _field(r, "general.architecture") == "gemma3"
    cfg = json.loads((run / "adapter_config.json").read_text())["mlx_gemma_tune"]
    alpha, rank = _field(r, "adapter.lora.alpha"), cfg["rank"]
    assert alpha == pytest.approx(cfg["alpha"])  # llama.cpp scales by alpha / rank: mlx-lm's scale

    base_gguf = out.parent / "gemma3_text-f16.gguf"
    base_shapes = {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(str(base_gguf)).tensors}
    lora = {t.name: np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
            for t in r.tensors}
    assert all(t.tensor_type.name == "F32" for t in r.tensors)
    targets = {n[: -len(".lora_a")] for n in lora if n.endswith(".lora_a")}
    assert {n[: -len(".lora_b")] for n in lora if n.endswith(".lora_b")} == targets
    assert len(targets) == len(cfg["modules"]) == 4 * 7  # q, k, v, o, gate, up, down on 4 layers
    _, merged = hf_export
    base = {}
    for f in sorted(hf_model("gemma3_text").glob("*.safetensors")):
        base.update({k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(f)).items()})
    checked = 0
    for key in merged:
        name = gguf_export.tensor_name("gemma3", json.loads((hf_model("gemma3_text") / "config.json").read_text()), key)
        if name not in targets:
            continue
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        out_dim, in_dim = merged[key].shape
        assert a.shape == (rank, in_dim) and b.shape == (out_dim, rank), name
        assert base_shapes[name] == [in_dim, out_dim]  # ggml order: the base tensor the pair adapts
        delta, ours = merged[key] - base[key], alpha / rank * (b @ a)
        # the float32 merge rounds W + delta to half an ulp of |merged|, and the rank-r product (here and in
        # MLX, in another summation order) to a few ulps of its own size
        scale = np.abs(merged[key]).max() + np.abs(ours).max()
        assert np.abs(ours - delta).max() <= 4 * np.finfo(np.float32).eps * scale, name
        assert np.abs(delta).max() > 100 * np.finfo(np.float32).eps * np.abs(base[key]).max()  # training moved it
        checked += 1
    assert checked == len(targets)

    modelfile = (out.parent / "Modelfile").read_text()
    assert "FROM ./gemma3_text-f16.gguf\nADAPTER ./adapter.gguf\n" in modelfile
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile
    assert _field(gguf.GGUFReader(str(base_gguf)), "general.type") == "model"

    # a second adapter on the same base reuses the base file
    before = base_gguf.stat().st_mtime_ns
    res = run_cli(["export", run, "--format", "gguf-lora", "-o", out.parent / "second.gguf", "--ollama", "--force"])
    assert res.exit_code == 0, res.output
    assert "(reused)" in res.stdout and base_gguf.stat().st_mtime_ns == before
    assert "ADAPTER ./second.gguf" in (out.parent / "Modelfile").read_text()


def test_gguf_lora_refusals_write_nothing(trained_run, hf_model, tmp_path):
    run = trained_run("gemma3_text")
    # a base GGUF of another model already where --ollama would put it
    (tmp_path / "o").mkdir()
    other = tmp_path / "o" / "gemma3_text-f16.gguf"
    w = __import__("gguf").GGUFWriter(str(other), "gemma3n")
    w.add_block_count(9)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(run_cli(["export", run, "--format", "gguf-lora", "-o", tmp_path / "o" / "a.gguf", "--ollama"]),
                          str(other), "different model", "gemma3n")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["gemma3_text-f16.gguf"]
    # not a run
    assert_one_line_error(run_cli(["export", hf_model("gemma3_text"), "--format", "gguf-lora", "-o", tmp_path / "b.gguf"]),
                          "not a run directory")
    # DoRA: no llama.cpp form
    dora = tmp_path / "dora"
    shutil.copytree(run, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["mlx_gemma_tune"]["method"] = "dora"
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli(["export", dora, "--format", "gguf-lora", "-o", tmp_path / "c.gguf"]),
                          "DoRA", "--format gguf")
    assert not (tmp_path / "b.gguf").exists() and not (tmp_path / "c.gguf").exists()
    assert_one_line_error(run_cli(["export", run, "--format", "gguf-lora", "-o", tmp_path / "d.gguf",
                                   "--outtype", "q8_0"]), "--ollama", code=2)
    assert_one_line_error(run_cli(["export", run, "--format", "gguf", "-o", tmp_path / "d.gguf",
                                   "--calibration", tmp_path / "x.jsonl"]), "--verify", code=2)


@pytest.mark.parametrize("args", [["--outtype", "q4_k_m"], ["--outtype", "q5_0"], ["--verify"]])
def test_llama_cpp_quantizations_without_the_extra_say_how_to_install(args, trained_run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    out = tmp_path / "m.gguf"
    line = assert_one_line_error(run_cli(["export", trained_run("gemma3_text"), "--format", "gguf", "-o", out, *args]),
                                 "llama-cpp-python", "pip install 'mlx-gemma-tune[llama-cpp]'")
    assert args[-1] in line
    assert list(tmp_path.iterdir()) == []
