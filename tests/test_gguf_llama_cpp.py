"""Opt-in: llama.cpp itself runs our GGUF files (skipped unless llama-cpp-python is installed).

    .venv/bin/pip install -e '.[llama-cpp]'    # builds llama.cpp from source (cmake + a C++ compiler)
    bash scripts/test.sh tests/test_gguf_llama_cpp.py           # the fixtures (seconds)
    bash scripts/test.sh -m slow tests/test_gguf_llama_cpp.py   # + the real Gemma 3 270M (a minute)

Fixtures (Gemma 3n, and fine-tunes of the three Gemma 4 shapes): llama.cpp loads the file, its
logits for a prompt equal our MLX model's (run with the same f16-rounded weights) and it tokenizes
the chat prompt to the same ids. Real model (slow): a short LoRA on the bundled Gemma 3 270M,
exported to GGUF (f16); llama.cpp's greedy continuation of a held-out prompt equals our fused MLX
model's for 16 tokens; its q4_k_m export's greedy answers on held-out prompts against the f16 export's;
llama.cpp with the base GGUF + our GGUF LoRA adapter gives the merged GGUF's answers.

Also: K-quant exports carry llama.cpp's own per-tensor types, `--verify` reports perplexities, and
base + GGUF LoRA equals the merged GGUF on every family's fixture.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import assert_one_line_error, run_cli

llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python to run these tests")

# llama.cpp's Gemma 3n graph hard-codes E2B/E4B sizes: 256-wide per-layer inputs, LAuReL rank 64,
# K/V shared from layer 20 on, activation sparsity 0.95 in the first 10 layers.
GEMMA3N_AS_LLAMA_CPP_EXPECTS = dict(
    num_hidden_layers=22, layer_types=["full_attention" if i % 5 == 4 else "sliding_attention" for i in range(22)],
    hidden_size_per_layer_input=256, laurel_rank=64, num_kv_shared_layers=2, intermediate_size=2048,
    activation_sparsity_pattern=[0.95] * 10 + [0.0] * 12)
IDS = [2, 40, 41, 60, 71, 80, 99, 120, 7, 9, 33, 34]


def _mlx_logits(model_dir, ids):
    """Our MLX model's logits with its weight matrices rounded to f16, as the f16 GGUF holds them."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_map

    from mlx_gemma_tune import models

    model, tokenizer, _ = models.load(model_dir)
    model.update(tree_map(lambda p: p.astype(mx.float16).astype(mx.float32) if p.ndim > 1 else p,
                          model.parameters()))
    return np.array(model(mx.array([ids]))[0].astype(mx.float32)), tokenizer


def _llama_cpp_logits(path, ids):
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False,
                          type_k=0, type_v=0)  # float32 K/V cache, as MLX computes
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)])
    return scores, llm


@pytest.mark.parametrize("family,tolerance", [("gemma3n", 0.05), ("gemma4_edge", 0.005), ("gemma4_dense", 0.005),
                                              ("gemma4_moe", 0.005)])
def test_llama_cpp_runs_gemma3n_and_gemma4(family, tolerance, hf_model, tmp_path):
    """Same next-token choice at every position and logits within `tolerance` of their range.

    Gemma 3n's tolerance is wider because the random 22-layer AltUp fixture amplifies rounding: in
    MLX alone, rounding its weights to f16 moves the logits by 5% of their range, and llama.cpp
    rounds activations to f16 inside GELU and takes the sparsity threshold's std over n - 1."""
    import numpy as np

    from fixtures import gemma_fixtures

    if family == "gemma3n":
        model_dir = gemma_fixtures.build_fixture("gemma3n", tmp_path / "gemma3n",
                                                 text_overrides=GEMMA3N_AS_LLAMA_CPP_EXPECTS)
        source = model_dir
    else:
        data = tmp_path / "d.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}."}) + "\n"
                                for i in range(8)))
        sets = ["--set", "train.lr=1e-2", "--set", "train.iters=4", "--set", "data.valid_fraction=0"]
        assert run_cli(["train", "--model", hf_model(family), "--data", data, "-o", tmp_path / "run", *sets]).exit_code == 0
        assert run_cli(["fuse", tmp_path / "run", "-o", tmp_path / "fused"]).exit_code == 0
        model_dir, source = tmp_path / "fused", tmp_path / "run"
    res = run_cli(["export", source, "--format", "gguf", "-o", tmp_path / "m.gguf"])
    assert res.exit_code == 0, res.output

    ours, tokenizer = _mlx_logits(model_dir, IDS)
    theirs, llm = _llama_cpp_logits(tmp_path / "m.gguf", IDS)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    assert np.abs(theirs - ours).max() < tolerance * np.abs(ours).max()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France? 42 times."}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text, add_special_tokens=False)
    llm.close()


PROMPT = "Extract the fields as JSON: Maria Lopez, 34, moved from Madrid to Lyon in 2019."
N = 16


@pytest.mark.slow
def test_llama_cpp_greedy_output_equals_mlx(tmp_path):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from mlx_gemma_tune import demo, models

    base = demo.mlx_model("float32")
    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"Extract the fields as JSON: Person {i}, {20 + i}, lives in City {i}.",
             "completion": json.dumps({"name": f"Person {i}", "age": 20 + i, "city": f"City {i}"})}
            for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    res = run_cli(["train", "--model", base, "--data", data, "-o", run, "--set", "train.iters=6",
                   "--set", "train.batch_size=2", "--set", "data.valid_fraction=0", "--set", "lora.rank=8"])
    assert res.exit_code == 0, res.output
    assert run_cli(["fuse", run, "-o", tmp_path / "fused"]).exit_code == 0
    assert run_cli(["export", run, "--format", "gguf", "-o", tmp_path / "tuned.gguf"]).exit_code == 0

    model, tokenizer, _ = models.load(tmp_path / "fused")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ours = []
    for token, _ in generate_step(mx.array(ids), model, max_tokens=N, sampler=lambda x: mx.argmax(x, axis=-1)):
        ours.append(int(token))

    llm = llama_cpp.Llama(model_path=str(tmp_path / "tuned.gguf"), n_ctx=512, n_threads=2, verbose=False)
    # llama.cpp tokenizes the rendered prompt with the exported vocabulary exactly as the HF tokenizer does
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    theirs = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        theirs.append(int(token))
        if len(theirs) == N:
            break
    print("mlx:      ", tokenizer.decode(ours))
    print("llama.cpp:", tokenizer.decode(theirs))
    assert theirs == ours


# ---- llama.cpp quantizations, --verify, GGUF LoRA adapters -----------------------------------------

# Every weight row 256 wide (K-quant blocks are 256 values): no fallback types.
K_WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=1, head_dim=64)
# llama.cpp's choices (src/llama-quant.cpp): the tied embedding (also the output) is Q6_K in every one of
# these mixes; *_K_M give attn_v and ffn_down more bits (Q6_K) in some layers, with 4 layers layers 2 and 3.
K_TYPES = {"q4_k_m": ("Q4_K", {2, 3}, 15), "q5_k_m": ("Q5_K", {2, 3}, 17), "q6_k": ("Q6_K", set(), 18),
           "q4_0": ("Q4_0", set(), 2), "q5_0": ("Q5_0", set(), 8)}


@pytest.fixture(scope="module")
def k_wide_run(tmp_path_factory):
    from fixtures import gemma_fixtures

    root = tmp_path_factory.mktemp("kwide")
    return _short_run(gemma_fixtures.build_fixture("gemma3_text", root / "g3", text_overrides=K_WIDE), root)


def _short_run(model, root):
    """A 4-step LoRA of `model` on 8 question / answer rows: root / "run"."""
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}."}) + "\n"
                            for i in range(8)))
    sets = ["--set", "train.lr=1e-2", "--set", "train.iters=4", "--set", "data.valid_fraction=0"]
    assert run_cli(["train", "--model", model, "--data", data, "-o", root / "run", *sets]).exit_code == 0
    return root / "run"


@pytest.mark.parametrize("outtype", list(K_TYPES))
def test_llama_cpp_quantizations_have_llama_cpps_tensor_types(outtype, k_wide_run, tmp_path):
    import gguf

    out = tmp_path / "m.gguf"
    res = run_cli(["export", k_wide_run, "--format", "gguf", "--outtype", outtype, "-o", out, "--json"])
    assert res.exit_code == 0, res.output
    main, more_bits, file_type = K_TYPES[outtype]
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.file_type"].contents() == file_type
    got = {t.name: t.tensor_type.name for t in r.tensors}
    for name, qtype in got.items():
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        if name.endswith("norm.weight"):
            want = "F32"
        elif name == "token_embd.weight" or (name.endswith(("attn_v.weight", "ffn_down.weight"))
                                             and layer in more_bits):
            want = "Q6_K"
        else:
            want = main
        assert qtype == want, name
    result = json.loads(res.stdout)
    assert result["tensor_types"] == {t: list(got.values()).count(t) for t in set(got.values())}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # the f16 intermediate is gone
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=32, verbose=False)  # llama.cpp loads and runs it
    llm.eval(IDS)
    assert np.isfinite(np.array(llm.scores[: len(IDS)])).all()
    llm.close()


def test_verify_reports_what_quantization_costs(k_wide_run, tmp_path):
    out = tmp_path / "m.gguf"
    res = run_cli(["export", k_wide_run, "--format", "gguf", "--outtype", "q4_k_m", "-o", out, "--verify", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    ppl, top1 = r["verify_perplexity"], r["verify_top1"]
    assert set(ppl) == {"mlx", "f16", "q4_k_m"} and set(top1) == {"f16 vs mlx", "q4_k_m vs f16"}
    assert "built-in English sample" in r["verify_text"] and r["verify_tokens"] > 1000
    # llama.cpp's f16 file computes what MLX does: f16 rounds weights by 2^-11, which moves the mean
    # negative log-likelihood by far less than 2% (the random fixture's logits are large: ~65 nats)
    assert abs(np.log(ppl["f16"]) - np.log(ppl["mlx"])) < 0.02 * np.log(ppl["mlx"])
    assert top1["f16 vs mlx"] > 0.9 and 0 < top1["q4_k_m vs f16"] <= 1
    assert r["size_bytes"] < 0.45 * r["reference_size_bytes"]  # ~4.5-6.6 bits per weight vs 16
    res = run_cli(["export", k_wide_run, "--format", "gguf", "-o", tmp_path / "f16.gguf", "--verify",
                   "--calibration", tmp_path / "rows.jsonl"])
    assert_one_line_error(res, "rows.jsonl")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f"A {i}."}) + "\n"
                                                 for i in range(3)))
    res = run_cli(["export", k_wide_run, "--format", "gguf", "-o", tmp_path / "f16.gguf", "--verify",
                   "--calibration", tmp_path / "rows.jsonl"])
    assert res.exit_code == 0, res.output
    assert "3 rows of" in res.stdout and "perplexity MLX" in res.stdout


@pytest.mark.parametrize("family", ["gemma3_text", "gemma3n", "gemma4_edge", "gemma4_dense", "gemma4_moe"])
def test_base_plus_gguf_lora_equals_the_merged_gguf_and_k_quants_run(family, hf_model, tmp_path):
    from fixtures import gemma_fixtures

    model = hf_model(family)
    if family == "gemma3n":
        model = gemma_fixtures.build_fixture("gemma3n", tmp_path / "gemma3n", text_overrides=GEMMA3N_AS_LLAMA_CPP_EXPECTS)
    _short_run(model, tmp_path)
    assert run_cli(["export", tmp_path / "run", "--format", "gguf", "-o", tmp_path / "merged.gguf"]).exit_code == 0
    res = run_cli(["export", tmp_path / "run", "--format", "gguf-lora", "-o", tmp_path / "o" / "a.gguf", "--ollama"])
    assert res.exit_code == 0, res.output
    base_gguf = next((tmp_path / "o").glob(f"{model.name}-f16.gguf"))

    from mlx_gemma_tune import gguf_llama_cpp

    merged = gguf_llama_cpp.logits(tmp_path / "merged.gguf", [IDS])[0]
    with_lora = gguf_llama_cpp.logits(base_gguf, [IDS], lora=tmp_path / "o" / "a.gguf")[0]
    base = gguf_llama_cpp.logits(base_gguf, [IDS])[0]
    # only f16 rounding apart (merged weights rounded once, base and adapter separately), while
    # the adapter itself moves the logits far more: llama.cpp applied every adapted layer
    noise = np.abs(with_lora - merged).max()
    assert noise < 0.05 * np.abs(base - merged).max()
    # the same greedy token wherever the merged model's top two are further apart than that rounding
    top2 = np.sort(merged, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * noise
    assert decided.sum() >= len(IDS) // 2
    assert (with_lora.argmax(-1) == merged.argmax(-1))[decided].all()

    # the family's K-quant export: llama.cpp quantizes our f16 file and runs the result
    res = run_cli(["export", tmp_path / "run", "--format", "gguf", "--outtype", "q4_k_m", "-o", tmp_path / "q4.gguf",
                   "--json"])
    assert res.exit_code == 0, res.output
    # 64-wide fixture rows fall back from K-quant blocks to Q5_0 / Q8_0; AltUp, LAuReL, PLE stay f16
    assert any(t.startswith("Q") for t in json.loads(res.stdout)["tensor_types"])
    q4 = gguf_llama_cpp.logits(tmp_path / "q4.gguf", [IDS])[0]
    assert np.isfinite(q4).all() and np.abs(q4 - merged).max() < np.abs(merged).max()


@pytest.mark.slow
def test_270m_k_quant_and_gguf_lora_answers_in_llama_cpp(tmp_path):
    """Gemma 3 270M tuned on the bundled extraction task: llama.cpp's greedy answers to the held-out
    prompts from the q4_k_m export vs the f16 export (most rows the same; the count is printed and
    recorded in benchmarks/README.md), and from the base GGUF + our GGUF LoRA vs the merged GGUF."""
    from mlx_gemma_tune import dataset_files, demo, gguf_llama_cpp, models

    base = demo.mlx_model("float32")
    run = tmp_path / "run"
    res = run_cli(["train", "--model", base, "--data", "example:extraction", "-o", run, "--set", "train.iters=12",
                   "--set", "train.batch_size=2", "--set", "lora.rank=8", "--set", "train.lr=2e-4"])
    assert res.exit_code == 0, res.output
    for args in (["-o", tmp_path / "f16.gguf"], ["-o", tmp_path / "q4.gguf", "--outtype", "q4_k_m", "--verify"]):
        res = run_cli(["export", run, "--format", "gguf", *args])
        assert res.exit_code == 0, res.output
        print(res.stdout)
    res = run_cli(["export", run, "--format", "gguf-lora", "-o", tmp_path / "o" / "adapter.gguf", "--ollama"])
    assert res.exit_code == 0, res.output
    base_gguf = next((tmp_path / "o").glob("*-f16.gguf"))

    _, tokenizer, _ = models.load(base)
    rows = dataset_files.read_rows(dataset_files.held_out("example:extraction"))[:10]
    prompts = [tokenizer.apply_chat_template(r.messages[:-1], add_generation_prompt=True) for r in rows]
    stop = {tokenizer.convert_tokens_to_ids("<end_of_turn>"), tokenizer.eos_token_id}
    f16 = gguf_llama_cpp.greedy(tmp_path / "f16.gguf", prompts, 48, stop)
    q4 = gguf_llama_cpp.greedy(tmp_path / "q4.gguf", prompts, 48, stop)
    with_lora = gguf_llama_cpp.greedy(base_gguf, prompts, 48, stop, lora=tmp_path / "o" / "adapter.gguf")
    same_q4 = sum(a == b for a, b in zip(q4, f16))
    same_lora = sum(a == b for a, b in zip(with_lora, f16))
    for a, b, c in zip(f16, q4, with_lora):
        print("f16:       ", tokenizer.decode(a), "\nq4_k_m:    ", tokenizer.decode(b), "\nbase+lora: ", tokenizer.decode(c))
    print(f"q4_k_m answers equal to f16's on {same_q4}/{len(rows)} held-out rows; base + GGUF LoRA equal to the "
          f"merged GGUF's on {same_lora}/{len(rows)}")
    assert same_lora == len(rows)
    assert same_q4 > len(rows) // 2
