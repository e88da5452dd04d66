"""mlx-gemma-tune: fine-tune Gemma 3n and Gemma 4 on Apple Silicon with MLX.

The Python API (each name imported on first use, so importing the package stays cheap and
`mlx-gemma-tune --help` instant; mlx, mlx-lm and transformers load inside the functions):

    convert_model   a Hugging Face checkpoint -> an MLX model directory, optionally 4/8-bit (convert.convert)
    load_recipe     a shipped recipe or YAML file with overrides, resolved and checked (prepare.load_recipe)
    check_data      rows, formats, token lengths, refused rows of a dataset (data_check.check)
    train           train an adapter; returns the run's summary (prepare.train)
    ChatSession     chat with a model or run: streaming, adapter off / on / swap, base vs tuned (generate)
    evaluate_model  loss and task metrics of a model or run on a dataset (evaluate.evaluate)
    fuse            merge a run's adapter into its base as an MLX model (merge.fuse)
    export_hf, export_peft, export_gguf, export_gguf_lora
                    a transformers checkpoint, a PEFT adapter, a GGUF file, a llama.cpp LoRA adapter GGUF

`convert_model` and `evaluate_model` are named apart from the modules convert and evaluate, which
`from mlx_gemma_tune import convert` would otherwise mean.
"""

from mlx_gemma_tune.version import VERSION as __version__  # noqa: F401

_API = {
    "convert_model": ("convert", "convert"),
    "load_recipe": ("prepare", "load_recipe"),
    "check_data": ("data_check", "check"),
    "train": ("prepare", "train"),
    "ChatSession": ("generate", "ChatSession"),
    "evaluate_model": ("evaluate", "evaluate"),
    "fuse": ("merge", "fuse"),
    "export_hf": ("export", "export_hf"),
    "export_peft": ("peft_export", "export_peft"),
    "export_gguf": ("gguf_export", "export_gguf"),
    "export_gguf_lora": ("gguf_lora", "export_gguf_lora"),
}
__all__ = ["ChatSession", "check_data", "convert_model", "evaluate_model", "export_gguf", "export_gguf_lora",
           "export_hf", "export_peft", "fuse", "load_recipe", "train"]


def __getattr__(name):
    """The Python API (_API), imported on first use."""
    if name not in _API:
        raise AttributeError(f"module 'mlx_gemma_tune' has no attribute {name!r}")
    import importlib

    module, attr = _API[name]
    return getattr(importlib.import_module(f"mlx_gemma_tune.{module}"), attr)


def __dir__():
    return sorted(list(globals()) + list(_API))
