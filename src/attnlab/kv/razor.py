"""``razor``: retrieval heads keep everything, the others sinks + SnapKV-chosen + recent entries + a compensation token.

"RazorAttention: Efficient KV Cache Compression Through Retrieval Heads" (Tang et al., ICLR 2025,
https://arxiv.org/abs/2407.15891; paper 53). For RoPE models the protected heads are echo heads and
induction heads, found data-free on repeated random tokens
(:func:`attnlab.analysis.echo_heads.razor_head_scores`); a KV head is protected when any query head of
its GQA group is. The paper protects the top 14% induction + top 1% echo heads. We count the shares over
query heads; session 4's 8% + 3% were chosen on the tuning seed (1) of the 4K needle task at 70% of bytes
dropped, where they kept 0.85 of full accuracy (n=20) against 0.50 for 14% + 1% over KV heads (the
default is now 10% + 3%, chosen with the snap entries below). On the reported seed (0, n=50, H200) the
paper's method with these shares (``snap_share=0``) keeps 0.90 of needles against 0.98 for the full cache
(0.92 of full) and 0.30 of multikey answers against 0.40 (0.75), ahead of snapkv (0.56 / 0.24) and
streaming (0.22 / 0.16): benchmarks/results/kv_h200_s4.md; the default adds the snap entries described
below. Every other KV head keeps ``n_sink`` sink tokens and its most recent tokens, and folds the dropped
ones into a compensation token: the mean of their keys and values (the paper's eq. 4), attended with the
weight of all the tokens it stands for, i.e. logit + log(n_dropped) (our reading of eq. 5:
sum_kept e^{q k_i} v_i + n_d e^{q k^} v^ over sum_kept e^{q k_i} + n_d e^{q k^}).

Budget: the fraction of KV bytes kept over all layers and KV heads. Protected heads cost T entries each;
the recent window L_h of the others is what remains, shared equally (the paper's L_h = max(S0, N / C)).
When the budget cannot give every protected head its full cache and still leave ``min_window`` recent
tokens to the others, the lowest-scoring protected heads are released first.

Beyond the paper (``snap_share``, default 0.5 since session 5): every miss of the paper's method on seed
0 drops or changes the needle's last digit, so the compressed heads seem to need a few needle tokens too.
With ``snap_share=s`` a compressed head gives the share s of its recent window L_h to middle prompt
entries chosen as SnapKV chooses them (votes of the last 32 prompt queries, pooled over 5 positions), at
the same bytes; the compensation token then stands for the entries each head still drops.
``snap_share=0`` is the paper's method. On the tuning seed (1, n=30, H200) every snap variant (share 0.25
/ 0.5 / 0.75, 17-20 protected heads, pooling 5 or 15) reached needle 0.93 and multikey 0.47 (full: 1.00 /
0.47) against 0.87 / 0.43 without. A second tuning seed (2, n=30) broke the tie: 10% induction + 3% echo
heads with share 0.5 (20 protected heads, 202 snap + 202 recent entries) reached needle 1.00 and multikey
0.43 (full 1.00 / 0.47; share 0.25: 0.97 / 0.40; the paper's method 0.90 / 0.40), tied with 8% + 3% at
share 0.5 pooled over 15 positions and listed before it (session 5's default). On the reported seed (0,
n=50) it kept needle 0.94 of full's 0.98 (0.96 of full: target met) and multikey 0.34 of 0.40 (0.85: not
met), against 0.90 / 0.30 for the paper's method at the same bytes: benchmarks/results/kv_h200_s5.md and
kv_h200_s5_r2.md. A CPU diagnosis of seed-1 misses (``kv_razor_tune.py --diagnose``,
benchmarks/results/kv_razor_snap_seed1_cpu.md) showed that the misses need the needle in the compressed
heads of the early layers, whose observation-window votes do not point at it (session 6, seed 2 multikey
sample 2: the answer's digits rank 130th-3,800th among the pooled votes in layers 0-13, 4th-500th in most
heads of layers 14-22).

Beyond the paper (``heads="probe"``, the default since session 6): which heads to protect is measured
rather than scored on random tokens. :func:`probe_head_values` takes the session-5 razor as the operating
point and, on a few multikey prompts of a probe seed (7: neither tuned on nor reported), flips one KV head
at a time (protected -> compressed, or compressed -> protected, the same window) and records how much the
teacher-forced NLL of the full cache's own answer changes; the 20 heads with the largest value (the
count the 10% + 3% shares give) are protected. On SmolLM2 two heads dominate ((18, 2): 11.1 nats, (7, 2):
2.7) and the ranking keeps 8 of the session-5 heads, takes 12 others (6 in layers 0-4) and drops 12 whose
single-head values are within 0.06 nats of 0 (all of layers 21, 22 and 24; a one-head probe cannot see
heads that only matter together). A CPU check on seed 2, multikey sample 2 (the answer's last digit
dropped): compressing layers 0-9 or 10-19 alone drops it, any single one of layers 0-9 does not, adding
the needle's digits to the compressed heads of layers 0-9 restores it, and so does protecting the top 20
of a CPU probe on 4 samples (the stored ranking, 2 samples, does not fix this one, on the H200 or CPU).
Tuning seeds 1 + 2 (H200, session 6 round 1, n=50 multikey per seed and 25 needles on seed 1; seed 2's
needles ran out of time): probe heads multikey 42/100 (full 42/100: 2 lost, 2 won against full), needle
25/25 (full 25/25), against 40/100 (3 lost, 1 won) and 23/25 for the session-5 heads; the probe heads fix
both seed-1 needle misses, the "46 46" repeated-digit one included, and one truncated multikey answer; the default with its 5 least valuable
heads swapped for the 5 most valuable others 40/100 and 25/25; span pooling of the snap votes
(``snap_pool="max"``, 9 positions) 40/100 and 23/25, the same as without
(benchmarks/results/kv_h200_s6_r1.md). On the reported seed (0, H200, n=100, fixed before the run) the
default keeps multikey 0.42 [0.33, 0.52] against full's 0.41 (1.02 of full: target met; 3 answers lost, 4
won) and needle 0.98 against 0.98 (1.00: met) at budget 0.3 (kept 0.3014 of the bytes: 69.86% saved); at
budget 0.298 (70.05% saved) 43/100 vs 41/100 and 98/100 vs 98/100 (kv_h200_s6_b298.md). The first 50 of
those samples (the prompts of the session-5 n=50 runs), kept beside them: multikey 18/50 vs 20/50 (0.90
of full: not met) and needle 49/50 vs 49/50. Streaming: 0.24 / 0.23, snapkv: 0.23 / 0.63 (n=100). The
paper's method was not rerun at n=100 (its n=50 numbers: 0.30 / 0.90, above); benchmarks/results/kv_h200_s6.md."""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import Keep, Policy, PrefillView, split_full_heads, top_k_sorted
from .scores import WINDOW
from .snapkv import pool_votes

# model -> razor_head_scores(model): computed once per model and process (about a forward of 2K tokens)
_SCORES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_head_scores(model) -> dict[str, torch.Tensor]:
    """RazorAttention's echo/induction scores of ``model``, cached per model object and on disk.

    The disk copy (``<attnlab cache>/razor_scores/<model dir name>-<hash>.pt``, keyed by the model's
    ``name_or_path`` and shape) saves the scoring forward (minutes on a loaded 2-core CPU) in later runs.
    """
    if model not in _SCORES:
        path = _disk_path(model)
        if path is not None and path.exists():
            _SCORES[model] = torch.load(path)
        else:
            from ..analysis.echo_heads import razor_head_scores

            _SCORES[model] = razor_head_scores(model)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                torch.save(_SCORES[model], tmp)
                tmp.replace(path)
    return _SCORES[model]


def _disk_path(model):
    import hashlib
    from pathlib import Path

    from ..hf.cache_dir import cache_root

    name = str(getattr(model.config, "_name_or_path", "") or "")
    if not name:
        return None
    c = model.config.get_text_config(decoder=True)
    key = f"{name}|{c.num_hidden_layers}|{c.num_attention_heads}|{getattr(c, 'num_key_value_heads', None)}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_root() / "razor_scores" / f"{Path(name).name or 'model'}-{digest}.pt"


# The head probe's ranking (most valuable first) of models probed once, keyed by ``_model_key``; other models
# are probed on first use. SmolLM2-135M-Instruct (attnlab.load("smollm2")): probe_head_values' defaults (seed 7,
# multikey samples 0 and 1, 4,096 tokens, budget 0.3) on the H200, session 6 round 1 (benchmarks/results/kv_h200_s6_r1.json).
PROBE_ORDERS: dict[str, list[list[int]]] = {
    "smollm2-135m-instruct.q4_1-98362432|30|9|3": [
        [18, 2], [7, 2], [17, 1], [0, 0], [0, 1], [14, 0], [0, 2], [23, 0], [6, 0], [8, 0], [4, 0], [10, 2], [8, 2],
        [7, 1], [9, 1], [20, 2], [2, 2], [3, 1], [23, 1], [2, 1], [12, 0], [20, 1], [1, 0], [10, 1], [1, 1], [7, 0],
        [22, 1], [23, 2], [1, 2], [29, 0], [28, 0], [24, 2], [11, 1], [13, 2], [11, 2], [11, 0], [13, 0], [6, 1],
        [16, 2], [18, 0], [4, 2], [10, 0], [21, 0], [27, 2], [26, 1], [27, 0], [19, 2], [26, 0], [26, 2], [25, 2],
        [27, 1], [16, 1], [25, 0], [25, 1], [28, 1], [5, 0], [5, 2], [13, 1], [18, 1], [9, 0], [21, 1], [28, 2], [29, 1],
        [15, 2], [4, 1], [24, 0], [12, 2], [9, 2], [16, 0], [29, 2], [8, 1], [22, 2], [6, 2], [12, 1], [19, 0], [17, 2],
        [15, 0], [21, 2], [3, 2], [22, 0], [2, 0], [19, 1], [14, 2], [14, 1], [5, 1], [15, 1], [24, 1], [20, 0], [3, 0],
        [17, 0]
    ],
}
_PROBES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _model_key(model) -> str:
    """``<model dir name>|layers|heads|kv heads``: the same converted checkpoint on any machine gives the same key."""
    from pathlib import Path

    c = model.config.get_text_config(decoder=True)
    name = Path(str(getattr(model.config, "_name_or_path", "") or "model")).name
    return f"{name}|{c.num_hidden_layers}|{c.num_attention_heads}|{getattr(c, 'num_key_value_heads', None)}"


def _answer_nll(model, cache, length: int, target: list[int]) -> float:
    """Summed NLL of ``target[1:]`` teacher-forced after a prompt of ``length`` tokens under ``cache``
    (``target[0]``, the prefill's own next token, is fed first)."""
    from .session import cache_kwargs

    dev = model.device
    x = torch.tensor([target[:-1]], device=dev)
    k = x.shape[1]
    out = model(input_ids=x, attention_mask=torch.ones(1, length + k, dtype=torch.long, device=dev),
                position_ids=torch.arange(length, length + k, device=dev).view(1, -1), use_cache=True,
                **cache_kwargs(model, cache))
    lp = out.logits[0].float().log_softmax(-1)
    return float(-lp[torch.arange(k, device=dev), torch.tensor(target[1:], device=dev)].sum())


def probe_head_values(model, tokenizer, *, budget: float = 0.3, length: int = 4096, seed: int = 7,
                      samples: tuple[int, int] = (2, 0), max_new_tokens: int = 12, on_sample=None) -> torch.Tensor:
    """(L, H_kv) float64: each KV head's marginal value at razor's operating point (NOT in the paper).

    On ``samples`` = (multikey, needle) prompts of ``length`` tokens drawn with ``seed`` (several needles, one
    asked: RULER's niah_multikey_1, and single needles), the full cache's greedy answer is the target and the
    base is ``Razor(budget, heads="scores")`` (its protected heads, window and snap entries). A protected
    head's value is the rise of the target's summed NLL (teacher-forced) when it alone is compressed, a
    compressed head's the fall when it alone is protected too (the same window: bytes are ignored here);
    the mean over the samples. ``on_sample(task, sample, target ids, base NLL, (L, H_kv) values)`` after each.
    Cost: one prefill per sample and one short forward per KV head (on a 2-core CPU, ~40 s a 4K sample).
    """
    from ..eval import get_task
    from . import make_policy
    from .evaluate import _eos_ids, decode, record_prefill
    from .session import apply

    cfg = model.config.get_text_config(decoder=True)
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    base = Razor(budget=budget, heads="scores")
    base.prepare(model)
    eos = _eos_ids(model, tokenizer)
    total, count = torch.zeros(L, H, dtype=torch.float64), 0
    for task, n in zip(("multikey", "needle"), samples):
        if n <= 0:
            continue
        for s in get_task(task).make(tokenizer, length=length, n_samples=n, seed=seed):
            ids = torch.tensor([s.input_ids], device=model.device)
            T = ids.shape[1]
            mask, window = base.plan(T, L, H)
            v = torch.zeros(L, H, dtype=torch.float64)
            with apply(model, None) as session, torch.no_grad():
                rec, logits, _ = record_prefill(model, ids, frozenset({"window"}), session)
                first = logits.argmax(-1)
                rows, _, _ = decode(model, ids, first, rec.compressed(make_policy("full"), reserve=max_new_tokens + 4),
                                    max_new_tokens, eos, eos[0])
                target = rows[0]
                ref = _answer_nll(model, rec.compressed(base, reserve=max_new_tokens + 4), T, target)
                for layer in range(L):
                    for head in range(H):
                        m = mask.clone()
                        m[layer, head] = ~m[layer, head]
                        pol = _FixedPlan(budget=budget, heads="scores", protected=base.protected, mask=m,
                                         fixed_window=window)
                        d = _answer_nll(model, rec.compressed(pol, reserve=max_new_tokens + 4), T, target) - ref
                        v[layer, head] = d if mask[layer, head] else -d
            total += v
            count += 1
            if on_sample is not None:
                on_sample(task, s, target, ref, v)
    return total / max(1, count)


def probe_order(model, tokenizer=None) -> torch.Tensor:
    """(L * H_kv, 2) long (layer, kv_head), most valuable first by :func:`probe_head_values` (its defaults).

    A model in ``PROBE_ORDERS`` uses the stored ranking; another is probed once per process and cached on disk
    (``<attnlab cache>/razor_probe/``), its tokenizer loaded from ``model.config._name_or_path`` when not given.
    """
    if model in _PROBES:
        return _PROBES[model]
    key = _model_key(model)
    if key in PROBE_ORDERS:
        _PROBES[model] = torch.tensor(PROBE_ORDERS[key], dtype=torch.long)
        return _PROBES[model]
    import hashlib

    from ..hf.cache_dir import cache_root

    path = cache_root() / "razor_probe" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
    if path.exists():
        _PROBES[model] = torch.load(path)
        return _PROBES[model]
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path)
    values = probe_head_values(model, tokenizer)
    H = values.shape[1]
    flat = values.flatten().argsort(descending=True, stable=True)
    order = torch.stack([flat // H, flat % H], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(order, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    _PROBES[model] = order
    return order


def max_pool_votes(scores: torch.Tensor, kernel: int, *, right: bool = False) -> torch.Tensor:
    """(H, N) -> (H, N) maximum over a window of ``kernel`` positions, so the top entries come as spans.

    ``right=False``: a centered window (each vote peak lifts its ``kernel // 2`` neighbours on both sides
    to its own height); ``right=True``: position p takes the maximum of p - kernel + 1 .. p, so a peak
    lifts the ``kernel - 1`` positions after it (a key the question attends to brings the value after it).
    """
    N = scores.shape[1]
    if kernel <= 1 or N == 0:
        return scores
    x = scores.unsqueeze(1)
    if right:
        x = torch.nn.functional.pad(x, (kernel - 1, 0), value=float("-inf"))
        return torch.nn.functional.max_pool1d(x, kernel, stride=1).squeeze(1)[:, :N]
    return torch.nn.functional.max_pool1d(x, kernel, stride=1, padding=kernel // 2).squeeze(1)[:, :N]


def protection_order(scores: dict[str, torch.Tensor], *, induction_frac: float = 0.14,
                     echo_frac: float = 0.01, unit: str = "query") -> torch.Tensor:
    """(P, 2) long (layer, kv_head) of the protected KV heads, most important first.

    ``unit="query"``: the fractions count query heads, as the paper counts "heads" (14% of all heads
    are induction heads, 1% echo heads); a KV head is protected when any query head of its GQA group
    is. ``unit="kv"``: the fractions count KV heads (fewer protected heads under GQA; 1% of 90 KV
    heads is a single echo head). Importance, which orders the heads a tight budget releases first,
    is the larger of the KV head's induction and echo scores, each divided by its maximum.
    """
    from ..analysis.echo_heads import razor_retrieval_heads

    if unit not in ("query", "kv"):
        raise ValueError(f"`unit` must be 'query' or 'kv'; got {unit=}")
    ind, echo = scores["induction_kv"].double(), scores["echo_kv"].double()
    protect = razor_retrieval_heads(scores, induction_frac=induction_frac, echo_frac=echo_frac, kv=unit == "kv")
    if unit == "query":
        layers, n_kv = ind.shape
        protect = protect.view(layers, n_kv, -1).any(-1)
    importance = torch.maximum(ind / ind.max().clamp_min(1e-12), echo / echo.max().clamp_min(1e-12))
    cells = protect.nonzero()
    order = importance[cells[:, 0], cells[:, 1]].argsort(descending=True, stable=True)
    return cells[order]


@dataclass
class Razor(Policy):
    """Full cache on retrieval heads; sinks + snap-chosen + recent entries + compensation token elsewhere.

    Attributes:
        budget: fraction of all KV bytes kept (over every layer and KV head).
        protected: (P, 2) long (layer, kv_head) protected heads, most important first; None: found
            by ``prepare(model)`` (``heads`` says how; cached per model).
        n_sink: sink tokens kept by non-retrieval heads (N0).
        min_window: the least recent window a non-retrieval head keeps (S0) before protected heads
            are released to make room.
        compensation: add the compensation token.
        induction_frac, echo_frac: the shares of heads protected as induction / echo heads (paper:
            14% and 1%; default 10% and 3%, tuned as the module docstring says), used by ``prepare``
            when ``protected`` is None; with ``heads="probe"`` they only set how many heads are protected.
        unit: what those shares count, "query" heads (the paper's "heads") or "kv" heads.
        snap_share: NOT in the paper (0 = the paper's method; default 0.5, chosen on seeds 1 and 2 as the
            module docstring says). The share of each compressed
            head's recent window given instead to middle prompt entries chosen SnapKV-style (the
            attention of the last ``WINDOW`` prompt queries, summed over the GQA group, pooled over 5
            positions), at the same bytes: the head keeps sinks + those entries + a shorter recent
            window (never shorter than the observation window) + the compensation token (the mean of
            the entries still dropped, which now differ per head).
        snap_kernel: pooling width of those votes (odd; SnapKV's 5).
        snap_votes: "head": each compressed head keeps the entries its own query group votes for;
            "layer": every compressed head of a layer keeps the entries all the layer's KV heads
            vote for together (protected ones included: in the needle task they look at the needle).
        snap_pool: how the votes are pooled before the top entries are taken (NOT in the paper either):
            "avg" (SnapKV's centred average), "max" (centred maximum: a peak brings its neighbours as a
            span) or "right" (a peak brings the ``snap_kernel - 1`` tokens after it: a key the question
            attends to brings the value that follows it).
        heads: which KV heads are protected: "scores" (the paper: RazorAttention's echo / induction scores,
            the shares above) or "probe" (NOT in the paper: as many heads as the shares give, chosen by
            their marginal value at razor's operating point, :func:`probe_head_values`).
    """

    protected: torch.Tensor | None = None
    n_sink: int = 4
    min_window: int = 32
    compensation: bool = True
    induction_frac: float = 0.10
    echo_frac: float = 0.03
    unit: str = "query"
    snap_share: float = 0.5
    snap_kernel: int = 5
    snap_votes: str = "head"
    snap_pool: str = "avg"
    heads: str = "probe"
    name: ClassVar[str] = "razor"
    window: ClassVar[int] = WINDOW  # observation window of the snap_share scores
    _plans: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for arg in ("n_sink", "min_window"):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{arg}` must be an int >= 0; got {arg}={value!r}")
        if self.unit not in ("query", "kv"):
            raise ValueError(f"`unit` must be 'query' or 'kv'; got unit={self.unit!r}")
        share = self.snap_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share < 1.0:
            raise ValueError(f"`snap_share` must be a fraction in [0, 1); got snap_share={share!r}")
        k = self.snap_kernel
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"`snap_kernel` must be an odd int >= 1; got snap_kernel={k!r}")
        if self.heads not in ("scores", "probe"):
            raise ValueError(f"`heads` must be 'scores' or 'probe'; got heads={self.heads!r}")
        if self.snap_pool not in ("avg", "max", "right"):
            raise ValueError(f"`snap_pool` must be 'avg', 'max' or 'right'; got snap_pool={self.snap_pool!r}")
        if self.snap_votes not in ("head", "layer"):
            raise ValueError(f"`snap_votes` must be 'head' or 'layer'; got snap_votes={self.snap_votes!r}")
        if share > 0:
            self.scores = "window"  # instance attribute: only the snap option needs prefill scores
        if self.protected is not None:
            p = torch.as_tensor(self.protected, dtype=torch.long)
            if p.dim() != 2 or p.shape[1] != 2:
                raise ValueError(f"`protected` must be (P, 2) (layer, kv_head) pairs; got shape {tuple(p.shape)}")
            self.protected = p

    def prepare(self, model) -> None:
        if self.protected is None:
            self.protected = protection_order(model_head_scores(model), induction_frac=self.induction_frac,
                                              echo_frac=self.echo_frac, unit=self.unit)
            if self.heads == "probe":  # as many heads as the shares give, the probe's most valuable ones
                self.protected = probe_order(model)[: self.protected.shape[0]].clone()

    def plan(self, length: int, n_layers: int, n_kv: int) -> tuple[torch.Tensor, int]:
        """((L, H_kv) bool protected heads, recent window) that fit the budget for a prompt of ``length``."""
        key = (length, n_layers, n_kv)
        if key not in self._plans:
            if self.protected is None:
                raise ValueError("Razor needs `protected` heads or prepare(model) before selecting")
            heads = n_layers * n_kv
            total = self.budget * heads * length  # entries the budget allows, over all heads
            extra = 1 if self.compensation else 0
            p = self.protected.shape[0]
            while True:
                rest = heads - p
                window = math.floor((total - p * length) / rest) - self.n_sink - extra if rest else length
                if p == 0 or window >= self.min_window:
                    break
                p -= 1
            mask = torch.zeros(n_layers, n_kv, dtype=torch.bool)
            cells = self.protected[:p]
            mask[cells[:, 0], cells[:, 1]] = True
            self._plans[key] = (mask, max(1, window))
        return self._plans[key]

    def split_window(self, window: int) -> tuple[int, int]:
        """(snap entries, recent tokens) that share a compressed head's ``window`` entries."""
        if self.snap_share <= 0:
            return 0, window
        n_snap = min(math.floor(self.snap_share * window), max(0, window - WINDOW))
        return n_snap, window - n_snap

    def select(self, view: PrefillView) -> list[Keep]:
        T, H, dev = view.length, view.n_kv_heads, view.keys.device
        mask, window = self.plan(T, view.n_layers, H)
        keeps, heads = split_full_heads(mask[view.layer].to(dev), T)
        if heads.numel() == 0:
            return keeps
        G = heads.shape[0]
        n_snap, recent = self.split_window(window)
        sinks = min(self.n_sink, T)
        start = max(sinks, T - recent)  # first recent position
        n_snap = min(n_snap, start - sinks)
        middle = torch.zeros(G, 0, dtype=torch.long, device=dev)
        if n_snap > 0:
            if view.scores is None:
                raise ValueError("Razor(snap_share > 0) needs the prefill's 'window' scores")
            votes = view.scores[heads, sinks:start].float()  # (G, start - sinks)
            if self.snap_votes == "layer":
                votes = view.scores[:, sinks:start].float().sum(0, keepdim=True).expand(G, -1)
            votes = (pool_votes(votes, self.snap_kernel) if self.snap_pool == "avg"
                     else max_pool_votes(votes, self.snap_kernel, right=self.snap_pool == "right"))
            middle = top_k_sorted(votes, n_snap) + sinks
        index = torch.cat([torch.arange(sinks, device=dev).expand(G, -1), middle,
                           torch.arange(start, T, device=dev).expand(G, -1)], 1)
        n_drop = start - sinks - n_snap
        if n_drop == 0 or not self.compensation:
            keeps.append(Keep(heads, index))
            return keeps
        if n_snap == 0:  # the paper's method: one dropped span, the same for every head
            k_hat = view.keys[heads, sinks:start].float().mean(1, keepdim=True)  # (G, 1, D) eq. 4
            v_hat = view.values[heads, sinks:start].float().mean(1, keepdim=True)
        else:  # a different dropped set per head
            dropped = torch.ones(G, T, dtype=torch.bool, device=dev)
            dropped.scatter_(1, index, False)  # (G, T): exactly n_drop True per row
            w = dropped.unsqueeze(-1).float() / n_drop
            k_hat = (view.keys[heads].float() * w).sum(1, keepdim=True)
            v_hat = (view.values[heads].float() * w).sum(1, keepdim=True)
        log_w = torch.full((G, 1), math.log(n_drop), device=dev)
        keeps.append(Keep(heads, index, k_hat.to(view.keys.dtype), v_hat.to(view.values.dtype), log_w))
        return keeps


@dataclass
class _FixedPlan(Razor):
    """The head probe's razor: a given (L, H_kv) protected mask and recent window, whatever the bytes."""

    mask: torch.Tensor | None = None
    fixed_window: int = 0

    def plan(self, length: int, n_layers: int, n_kv: int) -> tuple[torch.Tensor, int]:
        return self.mask, self.fixed_window
