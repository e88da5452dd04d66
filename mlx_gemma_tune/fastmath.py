"""Elementwise functions a training step spends its time in, in the form MLX's backend runs fastest.

MLX's CPU backend (mlx[cpu] on Linux x86) evaluates mx.exp, mx.tanh and the tanh-GELU ~2.5x slower
than mx.power(e, x) at the same accuracy (~4e-6 relative, both; benchmarks/README.md), and a Gemma
training step on 2,048 tokens is dominated by exponentials: the attention softmax, the loss's softmax
over 262,144 logits per target token, the MLP's GELU. On the CPU backend these functions use the power
form, with their derivatives written out (only the output, or the input, is kept for the backward
pass); on a GPU (Metal, CUDA) they are MLX's own functions, unchanged.
"""

from __future__ import annotations

import functools
import math


def _on_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.gpu


@functools.cache
def _power_exp():
    import mlx.core as mx

    @mx.custom_function
    def power_exp(x):
        return mx.power(mx.array(math.e, dtype=x.dtype), x)

    @power_exp.vjp
    def power_exp_vjp(primals, cotangent, output):  # d e^x = e^x: only the output is needed
        return cotangent * output

    return power_exp


def exp(x):
    """e**x elementwise (any float dtype, any shape), differentiable; mx.exp on a GPU, on the CPU
    backend mx.power(e, x) with e^x as its derivative (the same accuracy, ~2.5x faster there)."""
    import mlx.core as mx

    return mx.exp(x) if _on_gpu() else _power_exp()(x)


def gelu_approx(x):
    """GELU with the tanh approximation (transformers' gelu_pytorch_tanh, mlx.nn.gelu_approx):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written as x * sigmoid(2u) with `exp`, so that it
    costs one exponential per value. Same shape and dtype as x."""
    import mlx.nn as nn

    if _on_gpu():
        return nn.gelu_approx(x)
    return _gelu_tanh()(x)


@functools.cache
def _gelu_tanh():
    import mlx.core as mx

    c = math.sqrt(2 / math.pi)

    def sigmoid_2u(x):  # sigmoid(2u) = (1 + tanh u) / 2, u = c (x + 0.044715 x^3)
        return 1 / (1 + _power_exp()(-2 * c * (x + 0.044715 * x * x * x)))

    @mx.custom_function
    def gelu(x):
        return x * sigmoid_2u(x)

    @gelu.vjp
    def gelu_vjp(primals, cotangent, output):
        x = primals if isinstance(primals, mx.array) else primals[0]  # one input: MLX passes the array itself
        s = sigmoid_2u(x)
        # d/dx [x s(2u)] = s + x * 2 s (1 - s) * du/dx, du/dx = c (1 + 3 * 0.044715 x^2)
        return cotangent * (s + x * 2 * s * (1 - s) * c * (1 + 3 * 0.044715 * x * x))

    return gelu


def tanh(x):
    """tanh elementwise, differentiable; mx.tanh on a GPU, on the CPU backend 1 - 2 / (1 + e^(2x)) with
    `exp` (exact limits: +-1 where e^(2x) overflows or vanishes; absolute error ~1e-7 near 0)."""
    import mlx.core as mx

    if _on_gpu():
        return mx.tanh(x)
    return 1 - 2 / (1 + _power_exp()(2 * x))


def geglu(gate, up):
    """gelu_approx(gate) * up (Gemma's MLP activation), differentiable, keeping only gate and up for the
    backward pass (the GELU and its derivative are recomputed there from gate, one exponential): one
    (tokens, intermediate) array less per layer than autodiff of the product, on every backend. Shapes
    broadcast as in gate * up; the dtype is theirs."""
    return _geglu()(gate, up)


@functools.cache
def _geglu():
    import mlx.core as mx

    c = math.sqrt(2 / math.pi)

    def parts(x):  # (gelu(x), gelu'(x)) with sigmoid(2u) = (1 + tanh u) / 2, u = c (x + 0.044715 x^3)
        s = 1 / (1 + exp(-2 * c * (x + 0.044715 * x * x * x)))
        return x * s, s + x * 2 * s * (1 - s) * c * (1 + 3 * 0.044715 * x * x)

    @mx.custom_function
    def geglu(gate, up):
        return parts(gate)[0] * up

    @geglu.vjp
    def geglu_vjp(primals, cotangent, output):
        gate, up = primals
        value, slope = parts(gate)
        return cotangent * up * slope, cotangent * value

    return geglu
