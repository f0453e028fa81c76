"""``moa``: a sliding window per KV head whose span grows with the input, ``alpha_h + beta_h * N``.

"MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression" (Fu et al., 2024,
https://arxiv.org/abs/2406.14909; paper 28). Each head keeps the attention sinks and its own recent
window; some heads need a span that grows with the input, others stay local at any length. The
elastic rule span = alpha + beta * N is chosen per head by (1) profiling the dense model on
calibration prompts followed by its own answers, then (2) picking one (alpha, beta) per head from a
small grid so that the summed loss is least while the KV entries fit the budget.

What differs from the paper (said here so nobody mistakes this for a reproduction):

* Profile: the paper ranks heads by a gradient-based "attention influence" on the answer loss; here a
  head's loss for a span S is the attention mass its final queries (the last 32 positions of prompt
  + dense answer, SnapKV's observation window, summed over the KV head's GQA group) put on positions
  that a window of S would drop: the zero-order term of the same influence, needing no backward pass.
* Optimiser: the paper solves a multi-objective MILP (Gurobi) over lengths; here the losses at every
  calibration length are summed and a multiple-choice knapsack is solved by Lagrangian relaxation
  (bisection on the multiplier) followed by greedy upgrades with the bytes left: exact on the convex
  hull of each head's (cost, loss) points, a few hundred tensor operations.
* The plan is chosen for the prompt length it serves (the constraint uses that length, the loss the
  calibration lengths), so the budget always holds; the paper picks one plan and validates it.
* GQA: one span per KV head (the paper converts GQA models to MHA first).
* Decoding: each window keeps its size (the oldest non-sink entry makes room, as in StreamingLLM); a
  head whose span covers the whole prompt keeps growing.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from .base import Keep, PrefillView
from .streaming import Streaming, streaming_index

ALPHAS = (16, 64, 256, 1024)  # tokens; the paper's grid reaches 8192 for 7B models at 8K-16K
BETAS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)  # the paper's grid spans 0 ... 0.875
CALIBRATION_TASKS = ("passkey", "variable_tracking")  # long-range dependencies, unlike most eval tasks
CALIBRATION_LENGTHS = (1024, 2048)  # the paper profiles at 2K/4K/8K and validates at a longer one
CALIBRATION_SEED = 9001  # far from the eval seeds (0 ...), so calibration prompts are never eval prompts

# model -> {settings: MoAProfile}; profiling runs once per model, settings and process
_PROFILES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class MoAProfile:
    """Where each KV head's final queries look, by distance from the last position, at a few lengths.

    Attributes:
        lengths: (C,) mean calibration length N_c (prompt + answer tokens) of each group of prompts.
        far: C tensors (L, H_kv, M_c): mass at distance d from the last position (d = 0 is the last
            token), over the non-sink positions, each head's mass summing to 1 with the sinks'.
        n_sink: sink positions excluded from ``far`` (they are always kept).
    """

    lengths: tuple[float, ...]
    far: tuple[torch.Tensor, ...]
    n_sink: int

    def lost(self, c: int, span: torch.Tensor) -> torch.Tensor:
        """(L, H_kv, P) mass a window of span[..., p] (long (L, H_kv, P) or (P,)) drops at length c."""
        far = self.far[c].double()
        tail = far.flip(-1).cumsum(-1).flip(-1)  # tail[..., d] = mass at distance >= d
        tail = torch.cat([tail, tail.new_zeros(*tail.shape[:-1], 1)], -1)
        idx = span.clamp(0, far.shape[-1]).expand(*far.shape[:-1], span.shape[-1])
        return torch.gather(tail, -1, idx)


def plan_spans(alphas: Sequence[float], betas: Sequence[float], length: float) -> torch.Tensor:
    """(P,) long, round(alpha + beta * length) for every (alpha, beta) of the grid, at least 1."""
    a = torch.tensor([float(x) for x in alphas], dtype=torch.float64).repeat_interleave(len(betas))
    b = torch.tensor([float(x) for x in betas], dtype=torch.float64).repeat(len(alphas))
    return torch.round(a + b * length).clamp_min(1).long()


def choose_plans(loss: torch.Tensor, cost: torch.Tensor, capacity: float) -> torch.Tensor | None:
    """(H,) plan per head: least total loss with total cost <= capacity (multiple-choice knapsack).

    Args:
        loss, cost: (H, P) float per head and plan.
        capacity: the most total cost allowed.

    Returns:
        (H,) long plan indices, or None when even the cheapest plans do not fit. Lagrangian relaxation
        (each head minimises loss + lam * cost; lam bisected to the smallest feasible value), then the
        best loss-per-cost upgrades that still fit.
    """
    loss, cost = loss.double(), cost.double()
    if float(cost.min(1).values.sum()) > capacity:
        return None

    def pick(lam: float) -> torch.Tensor:
        obj = loss + lam * cost
        best = obj.min(1, keepdim=True).values
        ties = obj <= best + 1e-12 * (1 + best.abs())
        return cost.masked_fill(~ties, math.inf).argmin(1)  # among equal objectives, the cheapest

    def total(choice: torch.Tensor) -> float:
        return float(cost.gather(1, choice[:, None]).sum())

    choice = pick(0.0)
    if total(choice) > capacity:
        lo, hi = 0.0, 1e-12
        while total(pick(hi)) > capacity:
            lo, hi = hi, hi * 4
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if total(pick(mid)) > capacity else (lo, mid)
        choice = pick(hi)
    return _fill(loss, cost, choice, capacity - total(choice))


def _fill(loss: torch.Tensor, cost: torch.Tensor, choice: torch.Tensor, room: float) -> torch.Tensor:
    """Spend ``room`` on the upgrades with the most loss saved per unit of extra cost, one at a time."""
    rows = torch.arange(loss.shape[0])
    while True:
        d_cost = cost - cost[rows, choice][:, None]
        d_loss = loss[rows, choice][:, None] - loss
        ok = (d_cost > 0) & (d_cost <= room) & (d_loss > 0)
        if not ok.any():
            return choice
        gain = torch.where(ok, d_loss / d_cost.clamp_min(1e-12), torch.full_like(loss, -1.0))
        h, p = divmod(int(gain.argmax()), loss.shape[1])
        room -= float(d_cost[h, p])
        choice[h] = p


def far_mass(scores: torch.Tensor, n_sink: int) -> torch.Tensor:
    """(H_kv, N - s) mass at distance d from the last position over non-sink positions, from window
    scores (H_kv, N) normalised per head (s = min(n_sink, N - 1) sinks)."""
    scores = scores.double()
    scores = scores / scores.sum(-1, keepdim=True).clamp_min(1e-30)
    s = min(n_sink, scores.shape[-1] - 1)
    return scores[:, s:].flip(-1)


def calibration_samples(tokenizer, tasks: Sequence[str], lengths: Sequence[int], n_samples: int, seed: int):
    """[(length, Sample)] of every task at every length (seeded; attnlab's long-context tasks)."""
    from ..eval import get_task

    out = []
    for length in lengths:
        for i, task in enumerate(tasks):
            spec = get_task(task)
            for s in spec.make(tokenizer, length=length, n_samples=n_samples, seed=seed + 1000 * i):
                out.append((length, s))
    return out


def model_tokenizer(model):
    """The tokenizer saved beside a local model (``model.name_or_path``); no download is attempted."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True)


def profile_model(model, tokenizer=None, *, tasks: Sequence[str] = CALIBRATION_TASKS,
                  lengths: Sequence[int] = CALIBRATION_LENGTHS, n_samples: int = 2,
                  seed: int = CALIBRATION_SEED, n_sink: int = 4, max_answer: int = 16) -> MoAProfile:
    """Profile ``model``: per calibration length, where each KV head's final queries look.

    Each prompt is followed by the dense model's own greedy answer (at most ``max_answer`` tokens,
    as MoA calibrates on model-generated answers); one recording forward then gives the attention of
    the last 32 positions to every key, summed over each KV head's query group.
    """
    from .session import apply, cache_kwargs

    tokenizer = tokenizer or model_tokenizer(model)
    samples = calibration_samples(tokenizer, tasks, lengths, n_samples, seed)
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    by_length: dict[int, list[tuple[int, list[torch.Tensor]]]] = {}
    for length, s in samples:
        ids = torch.tensor([s.input_ids], dtype=torch.long, device=model.device)
        with torch.no_grad():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_answer,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
        with apply(model, None) as session, torch.no_grad():
            cache = session.new_cache(score_kinds=frozenset({"window"}))
            model(seq, attention_mask=torch.ones_like(seq), **cache_kwargs(model, cache), use_cache=True)
            per_layer = [far_mass(layer.scores["window"][0], n_sink) for layer in cache.layers]
        by_length.setdefault(length, []).append((seq.shape[1], per_layer))
    lens, fars = [], []
    for length in sorted(by_length):
        group = by_length[length]
        width = max(p[0].shape[-1] for _, p in group)
        far = torch.zeros(n_layers, group[0][1][0].shape[0], width, dtype=torch.float64)
        for _, per_layer in group:
            for layer, f in enumerate(per_layer):
                far[layer, :, : f.shape[-1]] += f.cpu() / len(group)
        lens.append(sum(n for n, _ in group) / len(group))
        fars.append(far)
    return MoAProfile(tuple(lens), tuple(fars), n_sink)


@dataclass
class MoA(Streaming):
    """Per-KV-head elastic windows, alpha_h + beta_h * N, chosen under the KV budget.

    Attributes:
        budget: fraction of all KV bytes kept (over every layer and KV head) at the prompt's length.
        n_sink: sink tokens every head keeps (counted in the budget).
        alphas, betas: the plan grid; every (alpha, beta) pair is a candidate for every head.
        profile: a :class:`MoAProfile`; None: ``prepare(model)`` profiles the model on
            ``calibration`` (cached per model and settings).
        calibration: (tasks, lengths, samples per task and length) of the profiling run.
        tokenizer: for the calibration prompts; None: the one saved beside the model.
    """

    alphas: tuple[float, ...] = ALPHAS
    betas: tuple[float, ...] = BETAS
    profile: MoAProfile | None = None
    calibration: tuple = (CALIBRATION_TASKS, CALIBRATION_LENGTHS, 2)
    tokenizer: object = field(default=None, repr=False)
    name: ClassVar[str] = "moa"
    _plans: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alphas, self.betas = tuple(self.alphas), tuple(self.betas)
        if not self.alphas or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a)
                                  for a in self.alphas):
            raise ValueError(f"`alphas` must be a non-empty sequence of finite numbers; got alphas={self.alphas!r}")
        if not self.betas or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b <= 1.0
                                 for b in self.betas):
            raise ValueError(f"`betas` must be a non-empty sequence of fractions in [0, 1]; got betas={self.betas!r}")
        if self.profile is not None and not isinstance(self.profile, MoAProfile):
            raise ValueError(f"`profile` must be a MoAProfile or None; got {type(self.profile)=}")
        if self.profile is not None and self.profile.n_sink != self.n_sink:
            raise ValueError(f"the profile excludes {self.profile.n_sink} sinks but n_sink={self.n_sink}")
        tasks, lengths, n = self.calibration
        if not tasks or not lengths or isinstance(n, bool) or not isinstance(n, int) or n <= 0 \
                or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in lengths):
            raise ValueError("`calibration` must be (tasks, positive int lengths, positive int samples); "
                             f"got calibration={self.calibration!r}")

    def prepare(self, model) -> None:
        if self.profile is not None:
            return
        tasks, lengths, n = self.calibration
        key = (tuple(tasks), tuple(lengths), n, self.n_sink)
        cache = _PROFILES.setdefault(model, {})
        if key not in cache:
            cache[key] = profile_model(model, self.tokenizer, tasks=tasks, lengths=lengths, n_samples=n,
                                       n_sink=self.n_sink)
        self.profile = cache[key]

    def plan(self, length: int, n_layers: int, n_kv: int) -> torch.Tensor:
        """(L, H_kv) long entries each KV head keeps (sinks + span) for a prompt of ``length`` tokens."""
        key = (length, n_layers, n_kv)
        if key not in self._plans:
            if self.profile is None:
                raise ValueError("MoA needs a `profile` or prepare(model) before selecting")
            if self.profile.far[0].shape[:2] != (n_layers, n_kv):
                raise ValueError(f"the profile is for {tuple(self.profile.far[0].shape[:2])} (layers, KV heads), "
                                 f"the model has {(n_layers, n_kv)}")
            sinks = min(self.n_sink, length - 1)
            spans = plan_spans(self.alphas, self.betas, length).clamp_max(length - sinks)  # (P,)
            cost = (sinks + spans).double().expand(n_layers * n_kv, -1)
            loss = sum(self.profile.lost(c, plan_spans(self.alphas, self.betas, n))
                       for c, n in enumerate(self.profile.lengths)).reshape(n_layers * n_kv, -1)
            capacity = math.floor(self.budget * n_layers * n_kv * length + 1e-9)
            choice = choose_plans(loss, cost, capacity)
            if choice is None:  # not even the shortest spans fit: one uniform window (StreamingLLM)
                keep = torch.full((n_layers * n_kv,), max(1, capacity // (n_layers * n_kv)), dtype=torch.long)
            else:
                keep = cost[torch.arange(cost.shape[0]), choice].long()
            self._plans[key] = keep.view(n_layers, n_kv)
        return self._plans[key]

    def select(self, view: PrefillView) -> list[Keep]:
        T, dev = view.length, view.keys.device
        keep = self.plan(T, view.n_layers, view.n_kv_heads)[view.layer]
        out = []
        for n in keep.unique().tolist():
            heads = (keep == n).nonzero().squeeze(1).to(dev)
            index = streaming_index(T, n, self.n_sink, dev).expand(heads.shape[0], -1)
            out.append(Keep(heads, index, fixed_size=n < T))
        return out
