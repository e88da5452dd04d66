"""Reading recipe YAML and --set overrides: the text side of recipe.py (which validates and builds)."""

from __future__ import annotations

from pathlib import Path

from mlx_gemma_tune.errors import InputError, UserError


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise InputError(f"is not valid YAML ({line}{getattr(exc, 'problem', None) or exc})", where=str(path)) from None
    except UnicodeDecodeError:
        raise InputError("is not UTF-8 text", where=str(path)) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError("must be a mapping of sections (model, data, lora, train)", where=str(path))
    return raw


def parse_set(items: list[str]) -> dict[str, object]:
    """--set key=value pairs; values are read as YAML (numbers, true/false, null, lists)."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got '{item}'", hint="e.g. --set lora.rank=8")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def set_origins(items: list[str]) -> dict[str, str]:
    """key -> the `--set key=value` it came from, for messages that name a value's origin."""
    return {item.split("=", 1)[0].strip(): f"--set {item}" for item in items if "=" in item}


def yaml_lines(path: Path) -> dict[str, int]:
    """'section.key' (and 'section') -> the 1-based line of a recipe YAML file it is written on."""
    import yaml

    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    pairs = root.value if isinstance(root, yaml.MappingNode) else []
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in pairs}
    return lines | {f"{k.value}.{sub.value}": sub.start_mark.line + 1
                    for k, body in pairs if isinstance(body, yaml.MappingNode) for sub, _ in body.value}
