"""Gemma-exact training: the training forward (no cache) equals inference and transformers."""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
from pathlib import Path

import pytest

from fixtures.gemma_fixtures import FAMILIES
from helpers import assert_logits_close, run_cli

TOKENS_24 = [2, 33, 47, 58, 61, 77, 80, 95, 101, 120, 133, 150, 166, 181, 199, 210, 230, 245, 260, 280,
             300, 320, 340, 360]


def _hf_model(path: Path):
    import torch
    import transformers

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    if arch == "Gemma3nForConditionalGeneration":
        arch = "Gemma3nForCausalLM"  # its vision tower needs timm; the text model is what we train
    return getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()


def _hf_logits(path: Path, tokens):
    import torch

    with torch.no_grad():
        return _hf_model(path)(torch.tensor([tokens])).logits[0].numpy()


def _np(x):
    import mlx.core as mx
    import numpy as np

    return np.array(x.astype(mx.float32))


@pytest.mark.parametrize("family", FAMILIES)
def test_no_cache_equals_cache_equals_transformers(family, hf_model):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_gemma_tune import models

    model, _ = models.load_model(hf_model(family))
    x = mx.array([TOKENS_24])
    train = _np(model(x)[0])
    infer = _np(model(x, cache=make_prompt_cache(model))[0])
    ref = _hf_logits(hf_model(family), TOKENS_24)
    assert train.shape == ref.shape == (24, ref.shape[1])
    assert_logits_close(train, infer, what="training forward vs the cached forward")
    assert_logits_close(train, ref, what="training forward vs transformers")


def test_gemma3n_override_is_pinned(hf_model):
    """Fails when mlx-lm changes underneath: re-check (or drop) the override then."""
    import importlib

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model as stock_load

    from mlx_gemma_tune import models

    assert len(models.OVERRIDDEN_SOURCE_SHA256) == 8
    for name, digest in models.OVERRIDDEN_SOURCE_SHA256.items():
        module, _, path = name.partition(".models.")[2].partition(".")
        obj = importlib.import_module(f"mlx_lm.models.{module}")
        for part in path.split("."):
            obj = getattr(obj, part)
        obj = models.REPLACED.get(name, obj)  # a module global our fast paths replaced: mlx-lm's own
        src = inspect.getsource(obj)
        assert hashlib.sha256(src.encode()).hexdigest() == digest, f"mlx-lm changed {name}: re-check the override"
    # The bug the override fixes is still there in stock mlx-lm (issue #1674) ...
    stock, _ = stock_load(hf_model("gemma3n"))
    x = mx.array([TOKENS_24])
    gap = float(mx.abs(stock(x) - stock(x, cache=make_prompt_cache(stock))).max())
    assert gap > 1e-2, "mlx-lm now shares KV without a cache: the override may be obsolete"
    # ... and ours is the fixed class; fixes are registered for Gemma 3n, Gemma 3 and (blocked attention,
    # fastmath's GELU) Gemma 4.
    ours, _ = models.load_model(hf_model("gemma3n"))
    assert type(ours.model.language_model).__module__ == "mlx_gemma_tune.models"
    assert all(type(layer.mlp).__module__ == "mlx_gemma_tune.models" for layer in ours.layers)
    assert set(models.FIXES) == {"gemma3n", "gemma3_text", "gemma3", "gemma4", "gemma4_text"}


def _zero_pad_row_copy(hf_model, tmp_path) -> Path:
    from safetensors.numpy import load_file, save_file

    dst = tmp_path / "gemma3n-zero-pad"
    shutil.copytree(hf_model("gemma3n"), dst)
    tensors = load_file(dst / "model.safetensors")
    key = "model.language_model.embed_tokens.weight"
    tensors[key][0] = 0.0  # as in the real checkpoints: the <pad> row is zero
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _padded_batch():
    import mlx.core as mx

    inputs = mx.array([TOKENS_24[:12], TOKENS_24[:6] + [0] * 6])  # second row right-padded with <pad>
    targets = mx.array([TOKENS_24[1:13], TOKENS_24[1:7] + [0] * 6])
    mask = mx.array([[1.0] * 12, [1.0] * 6 + [0.0] * 6])
    return inputs, targets, mask


def test_zero_padding_row_gives_finite_loss(hf_model, tmp_path):
    import math

    from mlx_lm.utils import load_model as stock_load

    from mlx_gemma_tune import losses, models

    path = _zero_pad_row_copy(hf_model, tmp_path)
    stock, _ = stock_load(path)
    # the plain loss (logits at every position, the padded ones masked afterwards)
    assert math.isnan(float(losses.mean_loss(stock, *_padded_batch(), chunk=None))), "stock mlx-lm no longer gives NaN"
    ours, _ = models.load_model(path)
    assert math.isfinite(float(losses.mean_loss(ours, *_padded_batch(), chunk=None)))


def test_gemma3n_text_checkpoint(hf_model, tmp_path):
    """A Gemma3nForCausalLM (gemma3n_text) checkpoint converts, matches transformers, loads in mlx-lm."""
    import mlx.core as mx
    from mlx_lm import load as stock_load
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "g3n-text"
    shutil.copytree(hf_model("gemma3n"), src)
    config = json.loads((src / "config.json").read_text())
    text = config["text_config"] | {"model_type": "gemma3n_text", "architectures": ["Gemma3nForCausalLM"],
                                    "dtype": "float32"}
    (src / "config.json").write_text(json.dumps(text))
    tensors = load_file(src / "model.safetensors")
    kept = {"model." + k[len("model.language_model."):]: v for k, v in tensors.items()
            if k.startswith("model.language_model.")}
    save_file(kept, src / "model.safetensors", metadata={"format": "pt"})

    out = tmp_path / "mlx"
    res = run_cli(["convert", src, "-o", out, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model_type"] == "gemma3n_text"
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma3n"
    model, _ = stock_load(str(out))  # plain mlx-lm loads our output
    from mlx_lm.models.cache import make_prompt_cache

    got = _np(model(mx.array([TOKENS_24]), cache=make_prompt_cache(model))[0])
    ref = _hf_logits(src, TOKENS_24)
    assert_logits_close(got, ref)
