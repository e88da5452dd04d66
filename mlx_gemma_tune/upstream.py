"""Every place this project touches a library's internals, with the versions it was verified on.

mlx-gemma-tune builds on mlx-lm, mlx-vlm and transformers through their public APIs, except for the
contact points listed in CONTACTS: private names, internal modules, and methods of mlx-lm's Gemma
classes that models.py overrides (each pinned by the hash of its source in
models.OVERRIDDEN_SOURCE_SHA256). pyproject.toml pins the versions in VERIFIED; when a model loads
with other versions installed, models.load_model warns once (UpstreamWarning, shown by the CLI as one
`warning:` line), since a fix may no longer apply; `doctor` lists the same lines.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import PackageNotFoundError, version

from mlx_gemma_tune.errors import UserError

# The versions the fixes and contact points below were verified against (tests/test_upstream.py
# checks that pyproject.toml pins them and that every contact point resolves on them).
VERIFIED = {"mlx": "0.32.4", "mlx-lm": "0.32.2", "mlx-vlm": "0.7.10", "transformers": "5.24.0"}

# (package, "module:name" touched, what for, where)
CONTACTS = (
    ("mlx-lm", "mlx_lm.utils:_get_classes", "model classes for load_model with our Gemma 3n text type",
     "models.load_model"),
    ("mlx-lm", "mlx_lm.models.gemma3n:LanguageModel.__call__", "overridden: KV sharing without a cache",
     "models._gemma3n_language_model_class"),
    ("mlx-lm", "mlx_lm.models.gemma3n:MLP.__call__", "overridden: finite top-k gradient", "models._gemma3n_mlp_class"),
    ("mlx-lm", "mlx_lm.models.gemma3n:gelu_topk", "replaced inside the MLP override", "models._gemma3n_mlp_class"),
    ("mlx-lm", "mlx_lm.models.gemma3_text:Gemma3Model.__call__", "overridden: the embedding scale's dtype",
     "models._gemma3_text_model_class"),
    ("mlx-lm", "mlx_lm.models.gemma3_text:MLP.__call__", "overridden: fastmath's GELU", "models._gemma3_mlp_class"),
    ("mlx-lm", "mlx_lm.models.base:create_attention_mask", "replaced in Gemma modules: blocked masks",
     "attention.install"),
    ("mlx-lm", "mlx_lm.models.base:scaled_dot_product_attention", "replaced in Gemma modules: blocked attention",
     "attention.install"),
    ("mlx-lm", "mlx_lm.models.gemma4_text:geglu", "replaced: fastmath's GELU", "models._fast_paths"),
    ("mlx-lm", "mlx_lm.tokenizer_utils:TokenizerWrapper", "its `_tokenizer`: the transformers tokenizer inside",
     "data.hf_tokenizer"),
    ("mlx-lm", "mlx_lm.tool_parsers.gemma4:parse_tool_call", "parsing Gemma 4 tool calls", "tools.parse_call"),
    ("transformers", "transformers.integrations:_gguf_parse_value", "reading GGUF metadata values",
     "demo.hf_checkpoint"),
    ("transformers", "transformers.modeling_gguf_pytorch_utils:read_field", "reading GGUF fields", "demo"),
    ("transformers", "transformers.integrations.gguf.gguf_tokenizer_mapping:convert_gguf_tokenizer",
     "the tokenizer of the bundled GGUF model", "demo"),
)


class UpstreamWarning(UserWarning):
    """A library is installed at another version than the one this project's fixes were verified on."""


def installed(package: str) -> str | None:
    """The installed version of `package` (a distribution name such as "mlx-lm"), or None."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _same(package: str, have: str, verified: str) -> bool:
    """mlx-lm must be the very release (models.py overrides its code); the others the same minor."""
    if package == "mlx-lm":
        return have == verified
    return have.split(".")[:2] == verified.split(".")[:2]


def mismatches() -> list[str]:
    """One line per library installed at another version than VERIFIED (mlx-lm: the same release;
    mlx, mlx-vlm, transformers: the same minor version); empty when all match."""
    lines = []
    for package, verified in VERIFIED.items():
        have = installed(package)
        if have is not None and not _same(package, have, verified):
            lines.append(f"{package} {have} is installed; mlx-gemma-tune's fixes and checks were verified on "
                         f"{package} {verified}, so some may not apply (pip install '{package}=={verified}')")
    return lines


@functools.cache
def warn_on_load() -> None:
    """Warn (UpstreamWarning) once per process for each mismatch; models.load_model calls this."""
    import warnings

    for line in mismatches():
        warnings.warn(line, UpstreamWarning, stacklevel=3)


def resolve(contact: str):
    """The object a "module:attr.path" contact point names. Raises UserError in one line when the
    installed library no longer has it (the version it was verified on is named)."""
    module, _, path = contact.partition(":")
    package = next((p for p, c, _, _ in CONTACTS if c == contact), module.split(".")[0].replace("_", "-"))
    try:
        obj = importlib.import_module(module)
        for part in path.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise UserError(f"{package} {installed(package)} has no {module}.{path}, which mlx-gemma-tune relies on",
                        hint=f"install the verified version: pip install '{package}=={VERIFIED.get(package)}'") from None
    return obj
