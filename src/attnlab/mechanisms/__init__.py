"""Attention mechanisms as drop-in ``nn.Module``s: x (B, N, d_model) -> (B, N, d_model).

Each mechanism is one file with the paper's title in its docstring, a pure function of its core
math on (B, H, N, D) tensors, and a module ``Cls(d_model, n_heads, *, causal=False, **hparams)``
whose ``forward(x, context=None)`` owns its projections. ``MECHANISMS`` maps a name to the class;
``attnlab.models.TinyTransformer(mechanism=name)`` looks names up here. To add one: one import
and one dict entry below.
"""
from __future__ import annotations

from torch import nn

from .clear import ClearAttention, clear_attention
from .flowformer import FlowAttention, flow_attention
from .hilo import HiLoAttention
from .inline import InLineAttention, inline_attention
from .lightning import LightningAttention, lightning_attention
from .softmax import SoftmaxAttention, softmax_attention
from .moh import MoHAttention, moh_attention
from .positional import PositionalAttention, positional_attention
from .rcmha import RCMHAttention, relative_attention
from .selective import SelectiveAttention, selective_attention
from .sigma import DiffQKVAttention, diffqkv_attention
from .sigmoid import SigmoidAttention, sigmoid_attention
from .wide import WideAttention, wide_attention, wide_vs_deep
from .biformer import BiLevelRoutingAttention, bilevel_routing_attention
from .routing import RoutingAttention, routing_attention
from .combiner import CombinerAttention, combiner_attention
from .sparsifiner import SparsifinerAttention, sparsifiner_attention
from .sea import SEAAttention, sea_attention
from .kinetics import KineticsAttention, block_topk_attention, decode_cost

MECHANISMS: dict[str, type[nn.Module]] = {
    "softmax": SoftmaxAttention,
    "lightning": LightningAttention,
    "flowformer": FlowAttention,
    "inline": InLineAttention,
    "clear": ClearAttention,
    "hilo": HiLoAttention,
    "moh": MoHAttention,
    "selective": SelectiveAttention,
    "sigma": DiffQKVAttention,
    "sigmoid": SigmoidAttention,
    "positional": PositionalAttention,
    "wide": WideAttention,
    "rcmha": RCMHAttention,
    "biformer": BiLevelRoutingAttention,
    "routing": RoutingAttention,
    "combiner": CombinerAttention,
    "sparsifiner": SparsifinerAttention,
    "sea": SEAAttention,
    "kinetics": KineticsAttention,
}

__all__ = ["MECHANISMS", "SoftmaxAttention", "softmax_attention"]
__all__ += ["LightningAttention", "lightning_attention", "FlowAttention", "flow_attention"]
__all__ += ["InLineAttention", "inline_attention", "ClearAttention", "clear_attention"]
__all__ += ["HiLoAttention"]
__all__ += ["MoHAttention", "moh_attention", "SelectiveAttention", "selective_attention", "DiffQKVAttention",
            "diffqkv_attention", "SigmoidAttention", "sigmoid_attention", "PositionalAttention",
            "positional_attention", "WideAttention", "wide_attention", "wide_vs_deep",
            "RCMHAttention", "relative_attention"]
__all__ += ["BiLevelRoutingAttention", "bilevel_routing_attention", "RoutingAttention", "routing_attention"]
__all__ += ["CombinerAttention", "combiner_attention"]
__all__ += ["SparsifinerAttention", "sparsifiner_attention"]
__all__ += ["SEAAttention", "sea_attention"]
__all__ += ["KineticsAttention", "block_topk_attention", "decode_cost"]
