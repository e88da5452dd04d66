"""LoRA target policy per family, and short LoRA / QLoRA / DoRA runs that really learn."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from fixtures.gemma_fixtures import FAMILIES
from helpers import assert_logits_close, assert_one_line_error, rel_diff, run_cli

ALL = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
NO_KV = [n for n in ALL if n not in ("self_attn.k_proj", "self_attn.v_proj")]
NO_V = [n for n in ALL if n != "self_attn.v_proj"]
EXPERTS = ["experts.switch_glu.gate_proj", "experts.switch_glu.up_proj", "experts.switch_glu.down_proj"]

# family -> (layer path prefix, per-layer expected names). Layers 2-3 of gemma3n / edge are
# KV-shared (their K/V come from earlier layers); layer 3 of dense / MoE is a K=V global layer.
EXPECTED = {
    "gemma3_text": ("model.layers", [ALL, ALL, ALL, ALL]),
    "gemma3n": ("model.language_model.layers", [ALL, ALL, NO_KV, NO_KV]),
    "gemma4_edge": ("language_model.model.layers", [ALL, ALL, NO_KV, NO_KV]),
    "gemma4_dense": ("language_model.model.layers", [ALL, ALL, ALL, NO_V]),
    "gemma4_moe": ("language_model.model.layers", [ALL, ALL, ALL, NO_V]),
}


def _expected(family, names_per_layer=None, layers=None):
    prefix, per_layer = EXPECTED[family]
    per_layer = names_per_layer or per_layer
    return sorted(f"{prefix}.{i}.{n}" for i, names in enumerate(per_layer) for n in names
                  if layers is None or i in layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_policy_module_list(family, hf_model):
    from mlx_gemma_tune import families, models

    model, config = models.load_model(hf_model(family))
    assert sorted(families.lora_targets(model, config)) == _expected(family)


def test_policy_subsets_and_last_layers(hf_model):
    from mlx_gemma_tune import families, models

    model, config = models.load_model(hf_model("gemma4_edge"))
    att = [n for n in ALL if n.startswith("self_attn")]
    mlp = [n for n in ALL if n.startswith("mlp")]
    assert sorted(families.lora_targets(model, config, "attention")) == _expected(
        "gemma4_edge", [att, att, ["self_attn.q_proj", "self_attn.o_proj"]] * 1 + [["self_attn.q_proj", "self_attn.o_proj"]])
    assert sorted(families.lora_targets(model, config, "mlp")) == _expected("gemma4_edge", [mlp] * 4)
    assert sorted(families.lora_targets(model, config, ["q_proj", "down_proj"], num_layers=1)) == [
        "language_model.model.layers.3.mlp.down_proj", "language_model.model.layers.3.self_attn.q_proj"]
    moe, moe_config = models.load_model(hf_model("gemma4_moe"))
    with_experts = families.lora_targets(moe, moe_config, experts=True)
    assert sorted(with_experts) == _expected("gemma4_moe", [ALL + EXPERTS] * 3 + [NO_V + EXPERTS])
    # Nothing forbidden ever appears.
    for path in with_experts:
        assert not any(f in path for f in ("router", "altup", "laurel", "per_layer", "embed"))


@pytest.mark.parametrize("targets,experts,dora,family,needle", [
    (["altup.prediction_coefs"], False, False, "gemma3n", "not allowed"),
    (["router.proj"], False, False, "gemma4_moe", "not allowed"),
    (["q_prj"], False, False, "gemma3_text", "did you mean 'q_proj'?"),
    ("all", True, True, "gemma4_moe", "DoRA cannot adapt MoE expert layers"),
    ("all", True, False, "gemma4_dense", "has no MoE experts"),
])
def test_policy_refusals(targets, experts, dora, family, needle, hf_model):
    from mlx_gemma_tune import families, models
    from mlx_gemma_tune.errors import UserError

    model, config = models.load_model(hf_model(family))
    with pytest.raises(UserError) as err:
        families.lora_targets(model, config, targets, experts=experts, dora=dora)
    assert needle in err.value.one_line() and "lora." in err.value.one_line()


CHAT = [
    {"messages": [{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."},
                  {"role": "user", "content": "And three plus three?"}, {"role": "assistant", "content": "Six."}]},
    {"prompt": "Colour of the sky?", "completion": "Blue."},
    {"messages": [{"role": "user", "content": "Opposite of hot?"}, {"role": "assistant", "content": "Cold."}]},
]


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in CHAT) + "\n")
    return path


@pytest.fixture(scope="module")
def quantized(hf_model, tmp_path_factory):
    from mlx_gemma_tune.convert import convert

    cache = {}

    def get(family):
        if family not in cache:
            out = tmp_path_factory.mktemp("q4") / family
            convert(str(hf_model(family)), out, quantize=4)
            cache[family] = out
        return cache[family]

    return get


def _train(model_dir, method, steps=30, lr=1e-3, chat=CHAT, tmp=None):
    import mlx.optimizers as optim

    from mlx_gemma_tune import data, lora, models, train_step

    model, tokenizer, config = models.load(model_dir)
    settings = lora.LoraSettings(rank=8, alpha=16, dropout=0.0, method=method)
    lora.apply(model, config, settings)
    path = tmp / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in chat) + "\n")
    examples, _ = data.load_examples(tokenizer, path)
    batches = itertools.islice(itertools.cycle(list(data.batches(examples, 4))), steps)
    result = train_step.fit(model, batches, optim.Adam(learning_rate=lr))
    return model, config, settings, result


@pytest.mark.parametrize("method", ["lora", "qlora", "dora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_short_run_lowers_loss(family, method, hf_model, quantized, tmp_path):
    base = quantized(family) if method == "qlora" else hf_model(family)
    _, _, settings, result = _train(base, "dora" if method == "dora" else "lora", tmp=tmp_path)
    assert len(result.losses) == 30 and all(math.isfinite(x) for x in result.losses)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.5 * first, f"{family} {method}: loss {first:.3f} -> {last:.3f}"
    assert sorted(settings.modules) == _expected(family)


def test_zero_padding_row_trains_without_nan(hf_model, tmp_path):
    from test_exactness import _zero_pad_row_copy

    path = _zero_pad_row_copy(hf_model, tmp_path)
    # Rows of different lengths, so batches are right-padded with the zero <pad> row.
    _, _, _, result = _train(path, "lora", tmp=tmp_path)
    assert all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0]


def test_nan_stops_training_with_a_clear_message(hf_model, tmp_path):
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlx_gemma_tune import errors, lora, models, train_step

    model, _, config = models.load(hf_model("gemma3_text"))
    lora.apply(model, config, lora.LoraSettings(rank=4, alpha=8, dropout=0.0))
    inputs = mx.array([[2, 40, 41, 42]])
    good = (inputs, mx.array([[40, 41, 42, 43]]), mx.ones((1, 4)))
    before = {k: v for k, v in __import__("mlx.utils", fromlist=["x"]).tree_flatten(model.trainable_parameters())}
    model.model.embed_tokens.weight = mx.full(model.model.embed_tokens.weight.shape, float("nan"))
    with pytest.raises(errors.NonFiniteError) as err:
        train_step.fit(model, [good, good], optim.Adam(learning_rate=1e-3))
    assert "step 1" in err.value.one_line() and "not updated" in err.value.one_line()
    after = dict(__import__("mlx.utils", fromlist=["x"]).tree_flatten(model.trainable_parameters()))
    assert all(bool(mx.array_equal(before[k], after[k])) for k in before)


@pytest.mark.parametrize("family", ["gemma3n", "gemma4_moe"])
def test_adapter_round_trip_ours_and_mlx_lm(family, hf_model, tmp_path):
    """A saved adapter gives the same logits through our loader and through mlx-lm's."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model as stock_load

    from mlx_gemma_tune import lora, models

    model, _config, settings, _ = _train(hf_model(family), "lora", steps=5, tmp=tmp_path)
    adir = tmp_path / "adapter"
    lora.save(model, settings, adir)
    x = mx.array([[2, 40, 41, 60, 71, 80]])
    trained = model(x)

    ours, cfg = models.load_model(hf_model(family))
    loaded = lora.load(ours, cfg, adir)
    assert loaded.modules == settings.modules
    assert_logits_close(ours(x), trained, rtol=1e-5, what="our loader")  # the same operations: ~exact

    stock, _ = stock_load(hf_model(family))
    load_adapters(stock, str(adir))
    assert_logits_close(stock(x, cache=__import__("mlx_lm.models.cache", fromlist=["x"]).make_prompt_cache(stock)),
                        trained, what="mlx-lm's loader")
    base = models.load_model(hf_model(family))[0](x)
    assert rel_diff(base, trained) > 1e-2  # the adapter does change the model, far beyond the tolerance


def test_eval_with_adapter_and_bad_adapter(hf_model, tmp_path, chat_file):
    from mlx_gemma_tune import lora

    model, _, settings, _ = _train(hf_model("gemma4_edge"), "lora", steps=20, tmp=tmp_path)
    adir = tmp_path / "adapter"
    lora.save(model, settings, adir)
    base = run_cli(["eval", hf_model("gemma4_edge"), "--data", chat_file, "--json"])
    tuned = run_cli(["eval", hf_model("gemma4_edge"), "--data", chat_file, "--adapter", adir, "--json"])
    assert base.exit_code == 0 and tuned.exit_code == 0, base.output + tuned.output
    assert json.loads(tuned.stdout)["loss"] < 0.5 * json.loads(base.stdout)["loss"]
    # An adapter trained on another family does not fit: one line, not a traceback.
    bad = run_cli(["eval", hf_model("gemma3_text"), "--data", chat_file, "--adapter", adir])
    assert_one_line_error(bad, str(adir), "trained on")
