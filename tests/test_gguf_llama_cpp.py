"""Opt-in: llama.cpp itself runs our GGUF files (skipped unless llama-cpp-python is installed).

    .venv/bin/pip install llama-cpp-python     # builds llama.cpp from source (cmake + a C++ compiler)
    bash scripts/test.sh tests/test_gguf_llama_cpp.py           # the fixtures (seconds)
    bash scripts/test.sh -m slow tests/test_gguf_llama_cpp.py   # + the real Gemma 3 270M (a minute)

Fixtures (Gemma 3n, and fine-tunes of the three Gemma 4 shapes): llama.cpp loads the file, its
logits for a prompt equal our MLX model's (run with the same f16-rounded weights) and it tokenizes
the chat prompt to the same ids. Real model (slow): a short LoRA on the bundled Gemma 3 270M,
exported to GGUF (f16); llama.cpp's greedy continuation of a held-out prompt equals our fused MLX
model's for 16 tokens.
"""

from __future__ import annotations

import json

import pytest

from helpers import run_cli

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
