"""mlx-gemma-tune: fine-tune Gemma 3n and Gemma 4 on Apple Silicon with MLX.

Importing the package is cheap on purpose: mlx, mlx-lm and transformers are
imported inside the functions that need them, so `mlx-gemma-tune --help` is instant.
"""

__version__ = "0.1.0"


def __getattr__(name):
    """The Python API, imported on first use: export_hf, export_peft, fuse."""
    if name in ("export_hf", "export_peft", "fuse"):
        from mlx_gemma_tune import export

        return getattr(export, name)
    raise AttributeError(f"module 'mlx_gemma_tune' has no attribute {name!r}")
