"""Opt-in (slow): llama.cpp itself runs our GGUF of a real Gemma 3 270M fine-tune.

    pip install llama-cpp-python          # builds llama.cpp from source (cmake + a C++ compiler)
    bash scripts/test.sh -m slow tests/test_gguf_llama_cpp.py

Trains a short LoRA on the bundled Gemma 3 270M, exports it to GGUF (f16), and checks that
llama.cpp tokenizes a held-out chat prompt to the same ids and that its greedy continuation equals
our fused MLX model's for 16 tokens.
"""

from __future__ import annotations

import json

import pytest

from helpers import run_cli

pytestmark = pytest.mark.slow

PROMPT = "Extract the fields as JSON: Maria Lopez, 34, moved from Madrid to Lyon in 2019."
N = 16


def test_llama_cpp_greedy_output_equals_mlx(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python to run this test")
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
