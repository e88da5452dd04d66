"""mlx-gemma-tune: fine-tune Gemma 3n and Gemma 4 on Apple Silicon with MLX.

Importing the package is cheap on purpose: mlx, mlx-lm and transformers are
imported inside the functions that need them, so `mlx-gemma-tune --help` is instant.
"""

__version__ = "0.1.0"


def __getattr__(name):
    """The Python API, imported on first use: export_hf, export_peft, export_gguf, fuse."""
    if name == "export_hf":
        from mlx_gemma_tune.export import export_hf

        return export_hf
    if name == "export_peft":
        from mlx_gemma_tune.peft_export import export_peft

        return export_peft
    if name == "export_gguf":
        from mlx_gemma_tune.gguf_export import export_gguf

        return export_gguf
    if name == "fuse":
        from mlx_gemma_tune.merge import fuse

        return fuse
    raise AttributeError(f"module 'mlx_gemma_tune' has no attribute {name!r}")
