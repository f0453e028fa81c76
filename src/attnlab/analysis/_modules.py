"""Find the transformer blocks and their sub-modules in a transformers model, without an allow-list.

Supported block layouts (checked by attribute, not by class name):
- pre-norm decoders (Llama, Mistral, Qwen, SmolLM2, ...): ``input_layernorm``, ``post_attention_layernorm``,
  ``self_attn.o_proj``;
- GPT-2 style: ``ln_1``, ``ln_2``, ``attn.c_proj``;
- BERT style (post-norm encoders): ``attention.output.dense``, ``attention.output.LayerNorm``.
"""
from __future__ import annotations

import torch


def n_layers_of(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not n:
        raise ValueError(f"cannot tell the number of layers of {type(model).__name__}: no config.num_hidden_layers")
    return int(n)


def find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of transformer blocks (the first one of length ``num_hidden_layers``)."""
    n = n_layers_of(model)
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise ValueError(f"no ModuleList of {n} blocks found in {type(model).__name__}; not a transformers model?")


def block_kind(block: torch.nn.Module) -> str:
    """'prenorm', 'gpt2' or 'bert' (see module doc); ValueError for anything else."""
    if hasattr(block, "input_layernorm") and hasattr(block, "post_attention_layernorm"):
        return "prenorm"
    if hasattr(block, "ln_1") and hasattr(block, "ln_2"):
        return "gpt2"
    out = getattr(getattr(block, "attention", None), "output", None)
    if out is not None and hasattr(out, "dense") and hasattr(out, "LayerNorm"):
        return "bert"
    raise ValueError(
        f"unsupported block layout {type(block).__name__}: expected input_layernorm/post_attention_layernorm "
        "(Llama-like), ln_1/ln_2 (GPT-2) or attention.output.dense/LayerNorm (BERT)"
    )


def out_proj(block: torch.nn.Module) -> torch.nn.Module:
    """The attention output projection, whose input is the heads' outputs concatenated (B, N, H * Dv)."""
    kind = block_kind(block)
    if kind == "prenorm":
        return block.self_attn.o_proj
    if kind == "gpt2":
        return block.attn.c_proj
    return block.attention.output.dense


def first_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-states argument of a module call (positional or ``hidden_states=``)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise ValueError("cannot find the hidden states among the module's arguments")


def first_output(output) -> torch.Tensor:
    """A block's hidden-state output: the tensor itself or the first item of a tuple / ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output[0]
