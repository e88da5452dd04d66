"""Packing, compiled steps and gradient checkpointing compute the same numbers as the plain step."""

from __future__ import annotations

import pytest

from fixtures.gemma_fixtures import FAMILIES

ROWS = [[2, 40, 41, 60, 71, 80, 99], [2, 33, 47, 58], [2, 120, 150, 200, 255, 300, 310, 311, 90], [2, 77, 78]]
MASKS = [[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1]]


def _examples():
    from mlx_gemma_tune.data import Example

    return [Example(tokens=t, mask=[bool(v) for v in m], source=f"row{i}") for i, (t, m) in enumerate(zip(ROWS, MASKS))]


def _lora_model(path, dropout=0.0, rank=4):
    import mlx.core as mx

    from mlx_gemma_tune import lora, models

    model, config = models.load_model(path)
    mx.random.seed(0)
    lora.apply(model, config, lora.LoraSettings(rank=rank, alpha=8, dropout=dropout))
    # non-zero B matrices, so the adapter changes the model and has gradients everywhere
    from mlx.utils import tree_flatten

    params = [(k, mx.random.normal(v.shape) * 0.05) for k, v in tree_flatten(model.trainable_parameters())]
    model.load_weights(params, strict=False)
    return model


def test_pack_fills_sequences_first_fit_decreasing():
    from mlx_gemma_tune import packing

    bins = packing.pack([7, 4, 9, 3, 2, 6], capacity=12)
    assert bins == [[2, 3], [0, 1], [5, 4]]
    assert packing.pack([5, 5], capacity=5) == [[0], [1]]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_have_their_unpacked_losses(family, hf_model):
    """Two packed sequences (2 rows each, one padded) give every row the loss it has alone."""
    import mlx.core as mx

    from mlx_gemma_tune import losses, packing

    model = _lora_model(hf_model(family))
    ex = _examples()
    inputs, targets, mask, segments = packing.batch_arrays([[ex[0], ex[1]], [ex[2], ex[3]]])
    assert segments is not None and inputs.shape == (2, 11)
    for chunk in (None, 4):
        for seq, (a, b) in enumerate([(0, 1), (2, 3)]):
            for k, row in enumerate((a, b)):
                row_mask = mask * ((segments == k) & (mx.arange(2)[:, None] == seq))
                packed, n = losses.masked_cross_entropy(model, inputs, targets, row_mask, segments, chunk)
                i, t, m, s = packing.batch_arrays([[ex[row]]])
                assert s is None
                alone, n_alone = losses.masked_cross_entropy(model, i, t, m, None, chunk)
                assert int(n) == int(n_alone) == sum(MASKS[row][1:]), (family, row)
                assert abs(float(packed) - float(alone)) <= 1e-5 * max(1.0, abs(float(alone))), (family, row, chunk)


def _grads(model, batch, chunk=4):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_gemma_tune import losses

    def f(m):
        return losses.mean_loss(m, *batch[:3], chunk=chunk, segments=batch[3])

    mx.random.seed(7)
    value, grads = nn.value_and_grad(model, f)(model)
    mx.eval(value, grads)
    return float(value), dict(tree_flatten(grads))


def _assert_same(a, b, tol=1e-5):
    (va, ga), (vb, gb) = a, b
    assert abs(va - vb) <= tol * max(1.0, abs(va)), (va, vb)
    assert ga.keys() == gb.keys() and ga
    import mlx.core as mx

    for k in ga:
        scale = max(1.0, float(mx.abs(ga[k]).max()))
        assert float(mx.abs(ga[k] - gb[k]).max()) <= tol * scale, k


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients(family, hf_model, monkeypatch):
    import mlx.core as mx

    from mlx_gemma_tune import checkpointing, packing

    ex = _examples()
    batch = packing.batch_arrays([[ex[0], ex[1]], [ex[2], ex[3]]])
    model = _lora_model(hf_model(family))
    plain = _grads(model, batch)
    # selective: 2 of the 4 layers (the Gemma 3n fixture's 4 layers are all KV-source or KV-shared
    # layers, which stay as they are), then all of them
    assert checkpointing.checkpoint_layers(model, 2) == (0 if family == "gemma3n" else 2)
    assert [type(layer).__name__.startswith("Checkpointed") for layer in model.layers] == (
        [False] * 4 if family == "gemma3n" else [True, True, False, False])
    _assert_same(plain, _grads(model, batch))
    assert checkpointing.checkpoint_layers(model) == (0 if family == "gemma3n" else 4)
    _assert_same(plain, _grads(model, batch))

    # with dropout, the recomputation must draw the forward pass's masks: compare with the same
    # layers run without mx.checkpoint (same key handling, activations kept)
    model = _lora_model(hf_model(family), dropout=0.3)
    checkpointing.checkpoint_layers(model)
    with_ckpt = _grads(model, batch)
    monkeypatch.setattr(mx, "checkpoint", lambda f: f)
    _assert_same(with_ckpt, _grads(model, batch))


def test_compiled_and_eager_steps_train_the_same(hf_model):
    """A few optimizer steps (packed and unpacked batches, dropout on) with mx.compile on and off."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlx_gemma_tune import packing, train_step

    ex = _examples()
    batches = [packing.batch_arrays([[ex[0], ex[1]], [ex[2], ex[3]]]), packing.batch_arrays([[ex[2]], [ex[0]]]),
               packing.batch_arrays([[ex[3], ex[1]], [ex[0]]])]

    def run(compiled):
        model = _lora_model(hf_model("gemma3_text"), dropout=0.1)
        mx.random.seed(3)
        return train_step.fit(model, batches, optim.Adam(learning_rate=1e-2), compile=compiled, chunk=4).losses

    eager = run(False)
    mx.enable_compile()  # the suite disables it (MLX_DISABLE_COMPILE=1) to save kernel build time
    try:
        compiled = run(True)
    finally:
        mx.disable_compile()
    assert len(eager) == 3 and eager[0] != eager[-1]
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (eager, compiled)
