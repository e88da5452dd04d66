"""llama.cpp's own code through llama-cpp-python (the optional `[llama-cpp]` extra).

- quantize(): llama.cpp's quantizer (`llama_model_quantize`, what the `llama-quantize` tool runs)
  turns our f16 GGUF into q4_0 / q5_0 / q4_k_m / q5_k_m / q6_k, with llama.cpp's own per-tensor
  choices (Q6_K for the embedding and some attn_v / ffn_down layers in *_K_M, fallbacks for rows
  that are not a multiple of the 256-wide K-quant block, norms and routers kept as they are).
- score(): llama.cpp's logits for token chunks (a GGUF, optionally with a GGUF LoRA adapter), from
  which perplexity and greedy (top-1) choices follow, as `llama-perplexity` computes them.
- greedy(): llama.cpp's greedy continuation of prompts.

We never re-implement the K-quant maths: without the extra, these raise one UserError that says
how to install it.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from pathlib import Path

from mlx_gemma_tune.errors import UserError

# --outtype -> llama.cpp's llama_ftype (include/llama.h)
LLAMA_FTYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
                "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
INSTALL = "pip install 'mlx-gemma-tune[llama-cpp]'"
LOG: list[str] = []  # llama.cpp's recent log lines (it would print them all to stderr), for error messages
_callback = None  # our ctypes log callback, kept alive here


def _collect_log(llama_cpp) -> None:
    """Route llama.cpp's log (per-tensor quantization lines, fallbacks, load details) into LOG instead of
    stderr: llama-cpp-python's own filter maps ggml's levels wrongly and prints warnings anyway."""
    global _callback
    if _callback is None:
        @llama_cpp.llama_log_callback
        def collect(level, text, user_data):
            LOG.append(text.decode("utf-8", "replace"))
            del LOG[:-200]

        _callback = collect
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def _last_log_line() -> str:
    lines = [line.strip() for line in "".join(LOG).splitlines() if line.strip()]
    return f"; llama.cpp said: {lines[-1]}" if lines else ""


def require(what: str):
    """The llama_cpp module, or UserError naming `what` needed it and how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"{what} needs llama.cpp's own code (the llama-cpp-python package), which is not installed",
                        hint=f"{INSTALL} (it builds llama.cpp: cmake and a C++ compiler, a few minutes)") from None
    _collect_log(llama_cpp)
    return llama_cpp


def quantize(src: Path, dst: Path, outtype: str, threads: int | None = None) -> None:
    """Quantize the GGUF file `src` (f16 / bf16 / f32 weights) into `dst` with llama.cpp's quantizer.

    `outtype` is a key of LLAMA_FTYPES. Raises UserError when llama-cpp-python is missing or
    llama.cpp reports a failure (its return code)."""
    llama_cpp = require(f"--outtype {outtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[outtype])
    params.nthread = threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise UserError(f"llama.cpp's quantizer failed on this file (return code {rc}{_last_log_line()})", where=str(src),
                        hint="run again with --debug, or please report this")


@dataclass
class Scores:
    """Next-token statistics of one model over token chunks.

    nll: total negative log-likelihood (nats) of every token after the first of each chunk;
    tokens: how many tokens were predicted; top1: per chunk, the argmax token id at each position
    (int list, the prediction for the next token)."""
    nll: float
    tokens: int
    top1: list[list[int]]

    @property
    def perplexity(self) -> float:
        """exp(mean negative log-likelihood per predicted token), as llama-perplexity reports it."""
        return math.exp(self.nll / max(1, self.tokens))

    def agreement(self, other: Scores) -> float:
        """Fraction of positions whose greedy (top-1) next token equals other's (0..1)."""
        same = sum(a == b for x, y in zip(self.top1, other.top1) for a, b in zip(x, y))
        return same / max(1, sum(len(x) for x in self.top1))


def scores_from_logits(logits_per_chunk, chunks: list[list[int]]) -> Scores:
    """Scores from logits (float arrays (len(chunk), vocab), one per chunk) and the chunks' token ids."""
    import numpy as np

    nll, n, top1 = 0.0, 0, []
    for logits, ids in zip(logits_per_chunk, chunks):
        x = np.asarray(logits, dtype=np.float32)[: len(ids) - 1]
        m = x.max(-1, keepdims=True)
        logz = (m + np.log(np.exp(x - m).sum(-1, keepdims=True, dtype=np.float64)))[:, 0]
        nll += float((logz - x[np.arange(len(x)), ids[1:]]).sum(dtype=np.float64))
        n += len(x)
        top1.append(x.argmax(-1).tolist())
    return Scores(nll, n, top1)


def _open(llama_cpp, path: Path, n_ctx: int, lora: Path | None, logits_all: bool):
    kwargs = {"lora_path": str(lora)} if lora else {}
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
                              n_threads=os.cpu_count() or 1, **kwargs)
    except (ValueError, RuntimeError) as e:  # llama.cpp could not load the file
        raise UserError(f"llama.cpp cannot load this file ({e}{_last_log_line()})", where=str(lora or path)) from None
    finally:
        _collect_log(llama_cpp)  # Llama() puts llama-cpp-python's printing callback back
    return llm


def logits(path: Path, chunks: list[list[int]], lora: Path | None = None) -> list:
    """llama.cpp's logits (float32 numpy arrays (len(chunk), vocab)) of the GGUF `path`, with the GGUF
    LoRA adapter `lora` applied at scale 1, for each chunk of token ids (each evaluated from empty)."""
    llama_cpp = require("scoring a GGUF file")
    llm = _open(llama_cpp, path, max(len(c) for c in chunks), lora, logits_all=True)
    try:
        out = []
        for ids in chunks:
            llm.reset()
            llm.eval(ids)
            out.append(llm.scores[: len(ids)].copy())
        return out
    finally:
        llm.close()


def score(path: Path, chunks: list[list[int]], lora: Path | None = None) -> Scores:
    """Scores (perplexity, top-1) of llama.cpp's logits over each chunk of token ids."""
    return scores_from_logits(logits(path, chunks, lora), chunks)


def greedy(path: Path, prompts: list[list[int]], max_tokens: int, stop: set[int],
           lora: Path | None = None) -> list[list[int]]:
    """llama.cpp's greedy continuation (at most max_tokens ids, ending at a stop id) of each prompt."""
    llama_cpp = require("running a GGUF file")
    llm = _open(llama_cpp, path, max(len(p) for p in prompts) + max_tokens + 1, lora, logits_all=False)
    try:
        out = []
        for ids in prompts:
            llm.reset()
            got: list[int] = []
            for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                      reset=True):
                if int(token) in stop:
                    break
                got.append(int(token))
                if len(got) == max_tokens:
                    break
            out.append(got)
        return out
    finally:
        llm.close()
