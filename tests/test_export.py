"""`fuse` and `export`: merged models and adapters that load back in transformers and PEFT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fixtures.gemma_fixtures import FAMILIES
from helpers import assert_logits_close, assert_one_line_error, run_cli, snapshot

TOKENS = [2, 40, 41, 60, 71, 80, 99, 120, 150, 200, 255, 300]
ROWS = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(8)]


@pytest.fixture(scope="module")
def runs(hf_model, tmp_path_factory):
    """runs(family, method) -> a short training run (lora | dora | qlora) whose adapter moved far from 0."""
    from mlx_gemma_tune import prepare, trainer

    done = {}

    def get(family, method):
        if (family, method) not in done:
            root = tmp_path_factory.mktemp(f"{family}-{method}")
            data = root / "d.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
            sets = ["train.lr=1e-2", "lora.rank=4", "lora.dropout=0.0", "train.iters=6", "data.valid_fraction=0",
                    "train.warmup_ratio=0", f"lora.method={'dora' if method == 'dora' else 'lora'}"]
            if method == "qlora":
                sets.append("model.quantize=4")
            trainer.run(prepare.prepare_run(model=str(hf_model(family)), data=str(data), out=str(root / "run"),
                                            sets=tuple(sets)))
            done[(family, method)] = root / "run"
        return done[(family, method)]

    return get


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MLX_GEMMA_TUNE_CACHE", str(tmp_path_factory.getbasetemp() / "model-cache"))


def _mlx_logits(model, tokens=TOKENS):
    import mlx.core as mx
    import numpy as np

    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def _stub_gemma3n_vision(monkeypatch):
    """transformers builds the Gemma 3n vision tower with timm (not installable here): stub it."""
    import torch
    from transformers.models.gemma3n import modeling_gemma3n as m3n

    real = m3n.AutoModel.from_config

    class NoVision(torch.nn.Module):
        pass

    monkeypatch.setattr(m3n.AutoModel, "from_config",
                        lambda cfg, **kw: NoVision() if cfg.model_type == "gemma3n_vision" else real(cfg, **kw))


def _load_original_class(path: Path, monkeypatch):
    """The export loaded as its original class; returns (model, loading info)."""
    import torch
    import transformers

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    if arch == "Gemma3nForConditionalGeneration":
        _stub_gemma3n_vision(monkeypatch)
    return getattr(transformers, arch).from_pretrained(path, dtype=torch.float32, output_loading_info=True)


def _torch_logits(model, tokens=TOKENS):
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def test_key_tables_round_trip_on_every_family(hf_model):
    """MLX names -> HF names reproduces the source checkpoint's text tensors exactly, and back."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_gemma_tune import export, models

    for family in FAMILIES:
        src = hf_model(family)
        model_type = json.loads((src / "config.json").read_text())["model_type"]
        model, _ = models.load_model(src)
        ours = dict(tree_flatten(model.parameters()))
        hf = export.to_hf_tensors(model_type, ours)
        source = mx.load(str(src / "model.safetensors"))
        assert set(hf) <= set(source), family
        for k, v in hf.items():
            assert v.shape == source[k].shape and bool(mx.array_equal(v, source[k])), (family, k)
        back = export.to_mlx_tensors(model_type, hf)
        assert set(back) == set(ours) and all(bool(mx.array_equal(back[k], ours[k])) for k in ours), family
        assert export.to_mlx_key(model_type, export.to_hf_key(model_type, "language_model.model.x")) == \
            "language_model.model.x" or model_type != "gemma4"


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_hf_loads_as_original_class_and_matches(family, method, runs, tmp_path, monkeypatch):
    from mlx_gemma_tune import merge

    run = runs(family, method)
    out = tmp_path / "hf"
    res = run_cli(["export", run, "--format", "hf", "-o", out, "--json"])
    assert res.exit_code == 0, res.output
    model, info = _load_original_class(out, monkeypatch)
    assert not info["missing_keys"], info["missing_keys"]
    unexpected = set(info["unexpected_keys"])
    if family == "gemma3n":  # only the keys of the stubbed (timm) vision tower
        assert unexpected and all(k.startswith("model.vision_tower.") for k in unexpected)
    else:
        assert unexpected == set()
    merged = merge.load_merged(str(run))  # the MLX fused model (QLoRA: the dequantized merge)
    got = _torch_logits(model)
    assert_logits_close(got, _mlx_logits(merged.model), what=f"{family} {method}")
    assert index_is_complete(out)
    meta = json.loads((out / "config.json").read_text())
    assert "quantization" not in meta and "quantization_config" not in meta


def index_is_complete(out: Path) -> bool:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    return all((out / f).is_file() for f in files) and all(f.startswith("model-") for f in files)


def test_gemma3n_towers_are_byte_identical(runs, hf_model, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "hf"
    assert run_cli(["export", runs("gemma3n", "lora"), "--format", "hf", "-o", out]).exit_code == 0
    src = safe_open(str(hf_model("gemma3n") / "model.safetensors"), "numpy")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    towers = [k for k in src.keys() if k.startswith(("model.audio_tower.", "model.vision_tower."))]  # noqa: SIM118 (safe_open is not iterable)
    assert any("audio_tower" in k for k in towers) and any("vision_tower" in k for k in towers)
    for k in towers:
        got = safe_open(str(out / index[k]), "numpy").get_tensor(k)
        assert got.dtype == src.get_tensor(k).dtype and got.tobytes() == src.get_tensor(k).tobytes(), k
    # The original config (with vision_config) and the tokenizer come along; no MLX metadata.
    assert json.loads((out / "config.json").read_text())["vision_config"] == \
        json.loads((hf_model("gemma3n") / "config.json").read_text())["vision_config"]
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert safe_open(str(out / next(iter(set(index.values())))), "numpy").metadata() == {"format": "pt"}


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_peft_matches_base_plus_adapter(family, method, runs, hf_model, tmp_path, monkeypatch):
    import peft

    from mlx_gemma_tune import lora, models

    run = runs(family, method)
    out = tmp_path / "peft"
    res = run_cli(["export", run, "--format", "peft", "-o", out])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] == (method == "dora") and cfg["lora_alpha"] == 32 and cfg["r"] == 4  # alpha 32, rank 4
    mlx_model, config = models.load_model(hf_model(family))
    lora.load(mlx_model, config, run)
    want = _mlx_logits(mlx_model)
    base, _ = _load_original_class(hf_model(family), monkeypatch)
    pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
    assert_logits_close(_torch_logits(pm), want, what="PeftModel")
    merged = pm.merge_and_unload()
    assert_logits_close(_torch_logits(merged), want, what="merge_and_unload")


def test_fuse_qlora_dequantizes_and_requantize_reports(runs, tmp_path):
    from mlx_lm import load

    from mlx_gemma_tune import lora, models, rundir

    run = runs("gemma4_edge", "qlora")
    out = tmp_path / "fused"
    res = run_cli(["fuse", run, "-o", out])
    assert res.exit_code == 0, res.output
    assert "dequantized" in res.stdout
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config
    fused, _ = load(str(out))  # plain mlx-lm loads it
    base_dir, adapter = rundir.resolve_target(str(run))
    qmodel, qconfig = models.load_model(Path(base_dir))
    assert "quantization" in qconfig
    lora.load(qmodel, qconfig, adapter)
    assert_logits_close(_mlx_logits(fused), _mlx_logits(qmodel))

    req = run_cli(["fuse", run, "-o", tmp_path / "req", "--requantize", "4", "--json"])
    assert req.exit_code == 0, req.output
    dev = json.loads(req.stdout)["deviation"]
    assert dev["max_abs"] > 0 and 0 < dev["relative_rms"] < 0.5
    # what re-quantizing costs the merged model on the built-in sample
    assert dev["perplexity_merged"] > 1 and dev["perplexity_requantized"] != dev["perplexity_merged"]
    assert 0 < dev["top1_agreement"] <= 1 and "built-in English sample" in dev["text"]
    assert json.loads((tmp_path / "req" / "config.json").read_text())["quantization"]["bits"] == 4
    human = run_cli(["fuse", run, "-o", tmp_path / "req2", "--requantize", "4"])
    assert "moved by up to" in human.stdout and "relative RMS" in human.stdout
    assert "re-quantized; same greedy next token" in human.stdout


def test_export_from_a_fused_model_and_verify(runs, tmp_path):
    run = runs("gemma4_moe", "lora")
    assert run_cli(["fuse", run, "-o", tmp_path / "fused"]).exit_code == 0
    res = run_cli(["export", tmp_path / "fused", "--format", "hf", "-o", tmp_path / "hf", "--verify", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["verify_passed"] and result["verified_max_diff"] < 1e-4
    assert result["restored"] == {"embed_vision": 1, "vision_tower": 15}
    with_dtype = run_cli(["export", tmp_path / "fused", "--format", "hf", "-o", tmp_path / "bf16", "--dtype",
                          "bfloat16", "--json"])
    assert with_dtype.exit_code == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    from mlx_gemma_tune import hf_checkpoint

    shard = next((tmp_path / "bf16").glob("model-*.safetensors"))
    assert {d for d, _ in hf_checkpoint.inspect_weights(shard, hash_it=False).tensors.values()} == {"BF16"}


def test_python_api(runs, tmp_path):
    import mlx_gemma_tune

    r = mlx_gemma_tune.export_peft(str(runs("gemma3_text", "lora")), str(tmp_path / "p"))
    assert r.format == "peft" and (tmp_path / "p" / "adapter_model.safetensors").is_file()
    h = mlx_gemma_tune.export_hf(str(runs("gemma3_text", "lora")), str(tmp_path / "h"))
    assert h.format == "hf" and (tmp_path / "h" / "config.json").is_file()


# ---- bad input ----------------------------------------------------------------------------------


def test_run_without_adapter(runs, tmp_path):
    fake = tmp_path / "run"
    fake.mkdir()
    shutil.copy(runs("gemma3_text", "lora") / "recipe.yaml", fake / "recipe.yaml")
    before = snapshot(tmp_path)
    assert_one_line_error(run_cli(["fuse", fake, "-o", tmp_path / "o"]), "without an adapter")
    assert_one_line_error(run_cli(["export", fake, "--format", "peft", "-o", tmp_path / "o"]), "without an adapter")
    assert snapshot(tmp_path) == before


def test_moved_source_checkpoint_and_base_flag(hf_model, tmp_path):
    from mlx_gemma_tune import prepare, trainer

    src = tmp_path / "hf-src"
    shutil.copytree(hf_model("gemma4_dense"), src)
    assert run_cli(["convert", src, "-o", tmp_path / "mlx"]).exit_code == 0
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    trainer.run(prepare.prepare_run(model=str(tmp_path / "mlx"), data=str(data), out=str(tmp_path / "run"),
                                    sets=("train.iters=2", "data.valid_fraction=0")))
    src.rename(tmp_path / "moved")
    res = run_cli(["export", tmp_path / "run", "--format", "hf", "-o", tmp_path / "out"])
    assert_one_line_error(res, str(src), "--base")
    assert not (tmp_path / "out").exists()
    ok = run_cli(["export", tmp_path / "run", "--format", "hf", "-o", tmp_path / "out", "--base", tmp_path / "moved"])
    assert ok.exit_code == 0, ok.output


def test_output_exists(runs, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep")
    for args in (["fuse", runs("gemma3_text", "lora"), "-o", tmp_path / "o"],
                 ["export", runs("gemma3_text", "lora"), "--format", "hf", "-o", tmp_path / "o"]):
        assert_one_line_error(run_cli(args), "already exists", "--force")
    assert (tmp_path / "o" / "x").read_text() == "keep"


def test_peft_refuses_expert_adapters(hf_model, tmp_path):
    from mlx_gemma_tune import prepare, trainer

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    trainer.run(prepare.prepare_run(model=str(hf_model("gemma4_moe")), data=str(data), out=str(tmp_path / "run"),
                                    sets=("train.iters=2", "lora.experts=true", "data.valid_fraction=0")))
    res = run_cli(["export", tmp_path / "run", "--format", "peft", "-o", tmp_path / "p"])
    assert_one_line_error(res, "MoE experts", "--format hf")
    # ... while a merged Hugging Face checkpoint of the same run works.
    ok = run_cli(["export", tmp_path / "run", "--format", "hf", "-o", tmp_path / "h", "--verify", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["verify_passed"] and json.loads(ok.stdout)["verified_max_diff"] < 1e-4


def test_verify_passes_a_good_export_and_fails_a_corrupted_one(runs, tmp_path, monkeypatch):
    """--verify says PASS or FAIL against a threshold from float32 rounding and the logit scale, and a
    wrong export (two layers' MLP output weights swapped: a classic mapping bug) exits 1."""
    from mlx_gemma_tune import export

    run = runs("gemma3_text", "lora")
    good = run_cli(["export", run, "--format", "hf", "-o", tmp_path / "good", "--verify"])
    assert good.exit_code == 0, good.output
    [line] = [x for x in good.stdout.splitlines() if x.startswith("Verify with transformers")]
    assert "PASS" in line and "tokens of text" in line and "the base model alone" in line
    as_json = run_cli(["export", run, "--format", "hf", "-o", tmp_path / "good2", "--verify", "--json"])
    result = json.loads(as_json.stdout)
    assert result["verify_passed"] is True and result["verified_max_diff"] <= result["verify_threshold"] < 1e-2
    assert result["verify_tokens"] > 20  # the text, not a handful of ids

    real = export.to_hf_tensors

    def swapped(model_type, tensors):
        out = real(model_type, tensors)
        a, b = (f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1))
        out[a], out[b] = out[b], out[a]
        return out

    monkeypatch.setattr(export, "to_hf_tensors", swapped)
    bad = run_cli(["export", run, "--format", "hf", "-o", tmp_path / "bad", "--verify", "--json"])
    assert bad.exit_code == 1
    result = json.loads(bad.stdout)
    assert result["verify_passed"] is False and result["verified_max_diff"] > 10 * result["verify_threshold"]
    assert result["verify_base_max_diff"] <= result["verify_threshold"]  # the base is fine: the export is wrong
    assert "--verify: FAIL" in bad.stderr and str(tmp_path / "bad") in bad.stderr
