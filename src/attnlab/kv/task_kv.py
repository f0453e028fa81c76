"""``task_kv``: heterogeneous heads keep everything; the others keep sinks, recent tokens and middle activations.

"Task-KV: Task-aware KV Cache Optimization via Semantic Differentiation of Attention Heads" (He, Liu,
Chen, 2025, https://arxiv.org/abs/2501.15113; paper 41). Heads whose output lies far from the heads'
semantic centre ("heterogeneous heads") carry task-specific semantics and keep their full KV cache;
the other heads mostly aggregate, so they keep the attention sinks, a few recent tokens and the
"middle activations": the prompt tokens that the non-heterogeneous heads attend to most.

Our reading (only the abstract was available to us; the choices below are ours, not the paper's):

* Semantic vector of a KV head: what its GQA group writes into the residual stream, i.e. each query
  head's attention output (the input of ``o_proj``, averaged over the last ``window`` prompt positions,
  where the question sits) times its slice of ``o_proj``, summed over the group. Vectors are compared
  by direction (unit length); the semantic centre is their mean over every layer and KV head, and a
  head's distance is the Euclidean distance of its unit vector from that centre.
* Semantic separator: heads with distance > mean + ``separator`` x std of all distances.
* Task awareness: the distances come from calibration prompts of the task at hand (``task=``), once
  per task; not from each input, because the ragged cache compresses every layer as soon as its
  prefill ends, before the later layers' heads exist.
* Middle activations (per input and layer): the top positions of the observation-window attention
  (the last 32 prompt queries, as SnapKV) summed over the layer's non-heterogeneous KV heads; every
  non-heterogeneous head of the layer keeps the same positions.
* Budget: the fraction of KV bytes over all layers and heads. Heterogeneous heads cost the whole
  prompt each; the rest is shared equally by the others; if that share falls below ``min_keep``, the
  least heterogeneous heads lose their full cache first (as ``razor`` does).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from ..hf.attach import attention_layers
from .base import Keep, Policy, PrefillView, split_full_heads, top_k_sorted
from .moa import CALIBRATION_SEED, CALIBRATION_TASKS, calibration_samples, model_tokenizer
from .scores import WINDOW

# model -> {settings: (L, H_kv) distances}; calibration runs once per model, task and process
_DISTANCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def semantic_vectors(model, input_ids: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """(L, H_kv, hidden) what each KV head's query group writes to the residual stream, averaged over
    the last ``window`` positions of ``input_ids`` (1, T).

    The input of ``o_proj`` is the concatenation of the query heads' attention outputs (B, T, H * D);
    head h's share of the attention output is ``W_o[:, h*D:(h+1)*D] @ x_h``, so the shares of all heads
    add up to the attention output (without an ``o_proj`` bias).
    """
    layers = attention_layers(model)
    config = model.config.get_text_config(decoder=True)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    means: dict[int, torch.Tensor] = {}

    def hook(idx):
        def grab(module, args):
            x = args[0][0, -window:].float().mean(0)  # (H * D,)
            means[idx] = x

        return grab

    handles = []
    for idx, module in layers.items():
        if not hasattr(module, "o_proj"):
            raise ValueError(f"{type(module).__name__} has no `o_proj`; task_kv needs the output projection")
        handles.append(module.o_proj.register_forward_pre_hook(hook(idx)))
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = []
    for idx in sorted(layers):
        w = layers[idx].o_proj.weight.detach().float()  # (hidden, H * D)
        d = w.shape[1] // n_heads
        x = means[idx].view(n_heads, d)
        share = torch.einsum("ohd,hd->ho", w.view(w.shape[0], n_heads, d), x)  # (H, hidden)
        out.append(share.view(n_kv, n_heads // n_kv, -1).sum(1))
    return torch.stack(out).cpu()  # (L, H_kv, hidden)


def centre_distances(vectors: torch.Tensor) -> torch.Tensor:
    """(L, H_kv) distance of each head's unit vector from the mean unit vector over all heads."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    centre = unit.reshape(-1, unit.shape[-1]).mean(0)
    return (unit - centre).norm(dim=-1)


def heterogeneous_order(distance: torch.Tensor, separator: float) -> torch.Tensor:
    """(P, 2) long (layer, kv_head) with distance > mean + separator * std, farthest first."""
    d = distance.double()
    threshold = d.mean() + separator * d.std(unbiased=False)
    cells = (d > threshold).nonzero()
    order = d[cells[:, 0], cells[:, 1]].argsort(descending=True, stable=True)
    return cells[order]


def task_distances(model, tokenizer=None, *, tasks: Sequence[str] = CALIBRATION_TASKS, length: int = 1024,
                   n_samples: int = 2, seed: int = CALIBRATION_SEED, window: int = WINDOW) -> torch.Tensor:
    """(L, H_kv) semantic distances of the heads, from the mean semantic vectors over calibration prompts."""
    tokenizer = tokenizer or model_tokenizer(model)
    total = None
    samples = calibration_samples(tokenizer, tasks, [length], n_samples, seed)
    for _, s in samples:
        v = semantic_vectors(model, torch.tensor([s.input_ids], device=model.device), window)
        total = v if total is None else total + v
    return centre_distances(total / len(samples))


@dataclass
class TaskKV(Policy):
    """Full KV on heterogeneous heads; sinks + middle activations + recent tokens on the others.

    Attributes:
        budget: fraction of all KV bytes kept (over every layer and KV head).
        distance: (L, H_kv) semantic distance of each KV head from the centre; None: measured by
            ``prepare(model)`` on calibration prompts of ``task`` (cached per model and task).
        separator: heads farther than mean + separator * std of the distances are heterogeneous.
        task: the task whose prompts calibrate the distances (a name in ``attnlab.eval.TASKS``);
            None: a default mix (passkey, variable tracking).
        n_sink, n_recent: sinks and recent tokens each non-heterogeneous head keeps (within its share).
        min_keep: the least entries a non-heterogeneous head keeps before heterogeneous heads are
            released to make room.
        calibration: (length, samples) of the calibration prompts.
        tokenizer: for the calibration prompts; None: the one saved beside the model.
    """

    distance: torch.Tensor | None = None
    separator: float = 1.0
    task: str | None = None
    n_sink: int = 4
    n_recent: int = 32
    min_keep: int = 64
    calibration: tuple = (1024, 2)
    tokenizer: object = field(default=None, repr=False)
    name: ClassVar[str] = "task_kv"
    scores: ClassVar[str | None] = "window"
    window: ClassVar[int] = WINDOW
    _plans: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for arg in ("n_sink", "n_recent", "min_keep"):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{arg}` must be an int >= 0; got {arg}={value!r}")
        if isinstance(self.separator, bool) or not isinstance(self.separator, (int, float)) \
                or not math.isfinite(self.separator):
            raise ValueError("`separator` must be a finite number of standard deviations; "
                             f"got separator={self.separator!r}")
        if self.task is not None:
            from ..eval import get_task

            get_task(self.task)  # unknown names raise here, not minutes later
        if self.distance is not None:
            d = torch.as_tensor(self.distance, dtype=torch.float64)
            if d.dim() != 2 or not bool(torch.isfinite(d).all()):
                raise ValueError(f"`distance` must be a finite (layers, kv_heads) tensor; got shape {tuple(d.shape)}")
            self.distance = d
        length, n = self.calibration
        if any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in (length, n)):
            raise ValueError(f"`calibration` must be (positive int length, positive int samples); "
                             f"got calibration={self.calibration!r}")

    def prepare(self, model) -> None:
        if self.distance is not None:
            return
        tasks = (self.task,) if self.task else CALIBRATION_TASKS
        key = (tasks, *self.calibration)
        cache = _DISTANCES.setdefault(model, {})
        if key not in cache:
            length, n = self.calibration
            cache[key] = task_distances(model, self.tokenizer, tasks=tasks, length=length, n_samples=n)
        self.distance = cache[key]

    def heterogeneous(self) -> torch.Tensor:
        """(P, 2) long (layer, kv_head) beyond the separator, farthest first."""
        if self.distance is None:
            raise ValueError("TaskKV needs `distance` or prepare(model) before selecting")
        return heterogeneous_order(self.distance, self.separator)

    def plan(self, length: int, n_layers: int, n_kv: int) -> tuple[torch.Tensor, int]:
        """((L, H_kv) bool full-cache heads, entries each other head keeps) for a prompt of ``length``."""
        key = (length, n_layers, n_kv)
        if key not in self._plans:
            if tuple(self.distance.shape if self.distance is not None else ()) not in ((n_layers, n_kv), ()):
                raise ValueError(f"`distance` is {tuple(self.distance.shape)}, the model has {(n_layers, n_kv)} "
                                 "(layers, KV heads)")
            order = self.heterogeneous()
            heads = n_layers * n_kv
            total = math.floor(self.budget * heads * length + 1e-9)  # entries the budget allows
            p = order.shape[0]
            while True:
                rest = heads - p
                each = (total - p * length) // rest if rest else length
                if p == 0 or each >= min(self.min_keep, length):
                    break
                p -= 1
            mask = torch.zeros(n_layers, n_kv, dtype=torch.bool)
            mask[order[:p, 0], order[:p, 1]] = True
            self._plans[key] = (mask, max(1, min(length, each)))
        return self._plans[key]

    def select(self, view: PrefillView) -> list[Keep]:
        T, dev = view.length, view.keys.device
        mask, each = self.plan(T, view.n_layers, view.n_kv_heads)
        keeps, heads = split_full_heads(mask[view.layer].to(dev), T)
        if heads.numel() == 0:
            return keeps
        keeps.append(Keep(heads, self.shared_index(view.scores[heads], each).expand(heads.shape[0], -1)))
        return keeps

    def shared_index(self, scores: torch.Tensor, each: int) -> torch.Tensor:
        """(each,) ascending: sinks, the middle activations of ``scores`` (G, T) summed, the recent tokens."""
        T = scores.shape[-1]
        if each >= T:
            return torch.arange(T, device=scores.device)
        sinks = min(self.n_sink, each - 1)
        recent = min(self.n_recent, each - sinks)
        middle = each - sinks - recent
        votes = scores.float().sum(0, keepdim=True)[:, sinks: T - recent]  # (1, T - sinks - recent)
        chosen = top_k_sorted(votes, middle)[0] + sinks
        dev = scores.device
        return torch.cat([torch.arange(sinks, device=dev), chosen, torch.arange(T - recent, T, device=dev)])
