"""mlx-gemma-tune: fine-tune Gemma 3n and Gemma 4 on Apple Silicon with MLX.

Importing the package is cheap on purpose: mlx, mlx-lm and transformers are
imported inside the functions that need them, so `mlx-gemma-tune --help` is instant.
"""

__version__ = "0.1.0"
