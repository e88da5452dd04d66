"""LoRA / DoRA adapters on Gemma models: wrap the policy's modules, save and load them.

The wrapping layers are mlx-lm's own (LoRALinear, DoRALinear, LoRASwitchLinear), so
an adapter directory we write is also an mlx-lm adapter directory
(`mlx_lm.generate --adapter-path DIR` works). Our adapter_config.json adds the exact
module list, which mlx-lm's `keys` + `num_layers` cannot express on Gemma (KV-shared
and K=V layers lack some projections).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlx_gemma_tune import families, fsio
from mlx_gemma_tune.errors import InputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"


def _recipe_default(key: str):
    from mlx_gemma_tune import recipe

    return recipe.default(f"lora.{key}")


@dataclass
class LoraSettings:
    """An adapter's settings; the defaults are the recipe schema's (recipe.LoraConfig), their one home."""
    rank: int = field(default_factory=lambda: _recipe_default("rank"))
    alpha: float = field(default_factory=lambda: _recipe_default("alpha"))  # PEFT-style; mlx-lm's scale = alpha / rank
    dropout: float = field(default_factory=lambda: _recipe_default("dropout"))
    method: str = field(default_factory=lambda: _recipe_default("method"))  # lora | dora
    targets: list[str] | str = field(default_factory=lambda: _recipe_default("targets"))
    num_layers: int | None = field(default_factory=lambda: _recipe_default("num_layers"))  # last N layers; None = all
    experts: bool = field(default_factory=lambda: _recipe_default("experts"))
    modules: list[str] = field(default_factory=list)  # resolved full paths (filled by apply)
    base_model: str | None = None  # what it was trained on, to name it when it does not fit

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def apply(model, config: dict, settings: LoraSettings) -> list[str]:
    """Freeze the model and wrap the policy's modules with LoRA/DoRA; returns their paths."""
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

    dora = settings.method == "dora"
    paths = settings.modules or families.lora_targets(
        model, config, settings.targets, settings.num_layers, settings.experts, dora)
    model.freeze()
    modules = dict(model.named_modules())
    wrapped = []
    for path in paths:
        if path not in modules:
            raise InputError(f"adapter targets module '{path}', which this model does not have",
                             hint="was the adapter trained on another base model?")
        base = modules[path]
        if hasattr(base, "num_experts"):
            cls = LoRASwitchLinear
        else:
            cls = DoRALinear if dora else LoRALinear
        wrapped.append((path, cls.from_base(base, r=settings.rank, scale=settings.scale, dropout=settings.dropout)))
    model.update_modules(tree_unflatten(wrapped))
    settings.modules = list(paths)
    return list(paths)


def detach(model) -> dict:
    """Take every LoRA/DoRA layer out (the base modules go back in); returns them for attach()."""
    from mlx.utils import tree_unflatten

    wrappers = {p: m for p, m in model.named_modules() if "lora_a" in m and hasattr(m, "linear")}
    if wrappers:
        model.update_modules(tree_unflatten([(p, m.linear) for p, m in wrappers.items()]))
    return wrappers


def attach(model, wrappers: dict) -> None:
    """Put back the layers detach() took out (no weights are copied)."""
    from mlx.utils import tree_unflatten

    if wrappers:
        model.update_modules(tree_unflatten(list(wrappers.items())))


def trainable_parameters(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def save(model, settings: LoraSettings, out_dir: Path) -> None:
    """Write adapters.safetensors + adapter_config.json (mlx-lm's format, plus our module list)."""
    from mlx.utils import tree_flatten

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    fsio.atomic_save_safetensors(out_dir / ADAPTER_WEIGHTS, weights, metadata={"format": "mlx"})
    fsio.atomic_write_json(out_dir / ADAPTER_CONFIG, adapter_config(model, settings))


def _layer_index(model) -> dict[str, int]:
    """Decoder-layer path prefix -> layer number."""
    layer_ids = {id(layer): i for i, layer in enumerate(model.layers)}
    return {p: layer_ids[id(m)] for p, m in model.named_modules() if id(m) in layer_ids}


def adapter_config(model, settings: LoraSettings) -> dict:
    layers = _layer_index(model)
    spans = [(i, path[len(p) + 1:]) for path in settings.modules for p, i in layers.items()
             if path.startswith(p + ".")]
    first = min((i for i, _ in spans), default=0)
    return {
        # mlx-lm reads these three: its keys on its last num_layers layers. On the layers
        # where a key is absent or unused (KV-shared), mlx-lm adds a zero-initialised
        # LoRA that changes nothing; our loader uses the exact module list below.
        "fine_tune_type": settings.method,
        "num_layers": len(model.layers) - first,
        "lora_parameters": {"rank": settings.rank, "scale": settings.scale, "dropout": settings.dropout,
                            "keys": sorted({k for _, k in spans})},
        "mlx_gemma_tune": asdict(settings) | {"scale": settings.scale},
    }


def read_config(adapter_dir: Path) -> dict:
    """The adapter_config.json of an adapter directory (which must also hold its weights), or a clear error."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise InputError(f"is not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})",
                         where=str(adapter_dir))
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        why = f"line {exc.lineno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise InputError(f"is not valid JSON ({why})", where=str(cfg_path)) from None
    if not isinstance(cfg, dict):
        raise InputError("must hold a JSON object", where=str(cfg_path))
    return cfg


def settings_of(adapter_dir: Path, model=None) -> LoraSettings:
    """The settings an adapter was trained with (a plain mlx-lm adapter's modules need the model:
    without it, such an adapter is an InputError)."""
    cfg = read_config(adapter_dir)
    ours = cfg.get("mlx_gemma_tune")
    if ours:
        known = {k: v for k, v in ours.items() if k in LoraSettings.__dataclass_fields__}
        return LoraSettings(**known)
    if model is None:
        raise InputError("was not written by mlx-gemma-tune (no module list)", where=str(Path(adapter_dir) / ADAPTER_CONFIG),
                         hint="export a run that `mlx-gemma-tune train` wrote")
    # an adapter written by plain mlx-lm: its keys on its last num_layers layers
    lp = cfg.get("lora_parameters", {})
    rank = int(lp.get("rank", 8))
    settings = LoraSettings(rank=rank, alpha=float(lp.get("scale", 20.0)) * rank, dropout=float(lp.get("dropout", 0.0)),
                            method=cfg.get("fine_tune_type", "lora"))
    keys = lp.get("keys") or families.TARGET_GROUPS["all"]
    first = len(model.layers) - int(cfg.get("num_layers", len(model.layers)))
    modules = dict(model.named_modules())
    settings.modules = [f"{p}.{k}" for p, i in _layer_index(model).items() if i >= first
                        for k in keys if f"{p}.{k}" in modules]
    return settings


def load(model, config: dict, adapter_dir: Path) -> LoraSettings:
    """Wrap `model` as the adapter in `adapter_dir` says and load its weights.

    An image run's adapter on the vision projector loads whole into a model with the vision tower;
    a text model takes its language-model part (the projector only acts on images)."""
    from mlx.utils import tree_flatten

    adapter_dir = Path(adapter_dir)
    settings = settings_of(adapter_dir, model)
    present = dict(model.named_modules())
    settings.modules = [m for m in settings.modules if m in present or not m.startswith("embed_vision.")]
    trained_on = f"it was trained on {settings.base_model}" if settings.base_model else \
        "was it trained on another base model?"
    absent = [m for m in settings.modules if m not in present]
    if absent:
        raise InputError(f"adapter targets {len(absent)} modules this model does not have (e.g. '{absent[0]}')",
                         where=str(adapter_dir), hint=trained_on)
    apply(model, config, settings)
    from mlx_gemma_tune.hf_checkpoint import load_safetensors

    weights = load_safetensors(adapter_dir / ADAPTER_WEIGHTS)
    if "embed_vision" not in present:
        weights = {k: v for k, v in weights.items() if not k.startswith("embed_vision.")}
    params = dict(tree_flatten(model.trainable_parameters()))
    for name, w in weights.items():
        if name in params and params[name].shape != w.shape:
            detach(model)
            raise InputError(f"adapter tensor {name} has shape {tuple(w.shape)} but this model needs "
                             f"{tuple(params[name].shape)}", where=str(adapter_dir), hint=trained_on)
    try:
        model.load_weights(list(weights.items()), strict=False)
    except ValueError as exc:
        detach(model)
        raise InputError(f"adapter weights do not fit this model: {str(exc).splitlines()[0][:200]}",
                         where=str(adapter_dir), hint=trained_on) from None
    expected = {k for k, _ in tree_flatten(model.trainable_parameters())}
    missing = expected - set(weights)
    if missing:
        detach(model)
        raise InputError(f"adapter is missing {len(missing)} tensors (e.g. {min(missing)})", where=str(adapter_dir))
    model.eval()
    return settings
