"""Massive activations: residual-stream dimensions whose magnitude is far above the rest, and their tokens.

Papers: "See What You Are Told: Visual Attention Sink in Large Multimodal Models" (VAR; Kang et al.,
ICLR 2025, arXiv 2503.03321), whose sink tokens are those with max_{d in D_sink} |RMSNorm(h)_d| > 20,
and "Massive Activations in Large Language Models" (Sun et al., 2024), which it builds on.

Rule used here (per block output h (B, N, D), real tokens only):
- an entry h[b, n, d] is *massive* when |h| > ``ratio`` x median(|h|) over the layer (default 100)
  and |h| > ``floor`` (default 100, Sun et al.'s magnitude cut; it keeps tiny-scale layers quiet);
- VAR: the sink dimensions D_sink are model-specific (hard-coded per model in VAR); here D_sink is
  *discovered* as every dimension that is massive in some layer, and a token is a VAR sink at layer
  l (VAR scans layers 2..L-1) when max_{d in D_sink} |h_d| / rms(h) > ``tau`` = 20, with rms(h) =
  sqrt(mean_d h_d^2 + 1e-6), an RMSNorm without its learned weight.
Hidden states come from forward hooks on the blocks (removed on exit); each layer is reduced when it
is produced, so memory stays O(N * D) for one layer plus the sparse hits.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._modules import find_blocks, first_output

RATIO = 100.0
FLOOR = 100.0
TAU = 20.0  # VAR's threshold on RMSNorm'ed hidden states
VAR_FIRST_LAYER = 2  # VAR's DimProspector scans layers 2..L-1


def _check(ratio: float, floor: float, tau: float) -> None:
    for name, v in (("ratio", ratio), ("floor", floor), ("tau", tau)):
        if not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"`{name}` must be a positive number; got {name}={v!r}")


def reduce_layer(h: torch.Tensor, real: torch.Tensor, *, ratio: float, floor: float, tau: float) -> dict:
    """Reduce one block output h (B, N, D) with real-token mask (B, N) to the layer's record.

    Returns ``{"median_abs", "max_abs", "massive": [(b, n, d, value)], "rms_hits": [(b, n, d, value)]}``
    where ``rms_hits`` are entries with |h_d| / rms(h) > tau (candidates for the VAR rule).
    Cost: |h|, its exact median (in place) and two row reductions; both rules are then tested
    only on the few tokens whose row maximum could pass them (massive values sit on a handful of tokens).
    """
    h = h.detach().float().cpu()
    a = h.abs()
    all_real = bool(real.all())
    vals = (a if all_real else a[real]).reshape(-1)  # (n_real * D,), a view of a or a fresh copy
    if not vals.numel():
        return {"median_abs": 0.0, "max_abs": 0.0, "massive": [], "rms_hits": []}
    row_max = a.amax(-1)  # (B, N); before the median, which reorders ``vals`` (a's storage when all real)
    med = median_inplace_(vals)
    cut = max(ratio * med, floor)
    ok = real if not all_real else torch.ones_like(real)
    massive = _hits(h, (row_max > cut) & ok, cut, False)
    # rms(h) = sqrt(mean h^2 + 1e-6); a margin keeps every row the exact test below could accept
    rms = (torch.linalg.vector_norm(h, dim=-1).square() / h.shape[-1] + 1e-6).sqrt()
    rms_hits = _hits(h, (row_max > tau * rms * (1 - 1e-3)) & ok, tau, True)
    return {"median_abs": med, "max_abs": float(row_max[ok].max()), "massive": massive, "rms_hits": rms_hits}


def _hits(h: torch.Tensor, rows: torch.Tensor, cut: float, normed: bool) -> list[tuple[int, int, int, float]]:
    """(b, n, d, value) of the entries of candidate ``rows`` (B, N) bool whose magnitude exceeds ``cut``.

    ``normed``: compare and report h / sqrt(mean h^2 + 1e-6) (the VAR rule) instead of |h| and h.
    """
    idx = rows.nonzero()  # (R, 2)
    if not len(idx):
        return []
    sub = h[idx[:, 0], idx[:, 1]]  # (R, D)
    if normed:
        sub = sub * torch.rsqrt(sub.pow(2).mean(-1, keepdim=True) + 1e-6)
    out = []
    for r, d in ((sub.abs() > cut).nonzero().tolist()):
        out.append((int(idx[r, 0]), int(idx[r, 1]), int(d), float(sub[r, d])))
    return out


def median_inplace_(x: torch.Tensor) -> float:
    """``float(x.median())`` (the lower median) of a 1-D contiguous float CPU tensor, reordering ``x``.

    numpy's in-place introselect: measured ~10x faster than ``torch.median`` at 2.4M values, which
    copies its input and runs one thread.
    """
    arr = x.numpy()
    k = (arr.size - 1) // 2
    arr.partition(k)
    return float(arr[k])


def summarize(records: dict[int, dict], n_layers: int, first: torch.Tensor, *, tau: float = TAU,
              max_positions: int = 16) -> dict:
    """JSON summary of per-layer records (positions made relative to each sample's first real token).

    Returns:
        ``{"rule", "per_layer": {"median_abs", "max_abs", "max_ratio", "n_massive": [L]},
        "layers": [L] of {"dims": [{"dim", "max_abs", "n_tokens", "tokens": [[sample, position], ...]}]},
        "sink_dims": D_sink, "var_sink_tokens": [{"sample", "position", "layers", "max_normed"}]}``.
    """
    per_layer = {"median_abs": [], "max_abs": [], "max_ratio": [], "n_massive": []}
    layers, sink_dims = [], set()
    for layer in range(n_layers):
        r = records.get(layer)
        if r is None:
            for v in per_layer.values():
                v.append(None)
            layers.append(None)
            continue
        per_layer["median_abs"].append(r["median_abs"])
        per_layer["max_abs"].append(r["max_abs"])
        per_layer["max_ratio"].append(r["max_abs"] / r["median_abs"] if r["median_abs"] > 0 else None)
        per_layer["n_massive"].append(len(r["massive"]))
        dims: dict[int, dict] = {}
        for b, n, d, v in r["massive"]:
            e = dims.setdefault(d, {"dim": d, "max_abs": 0.0, "n_tokens": 0, "tokens": []})
            e["max_abs"] = max(e["max_abs"], abs(v))
            e["n_tokens"] += 1
            e["tokens"].append([b, n - int(first[b]), abs(v)])
        for e in dims.values():
            e["tokens"] = [[b, p] for b, p, _ in sorted(e["tokens"], key=lambda t: -t[2])[:max_positions]]
        sink_dims |= set(dims)
        layers.append({"dims": sorted(dims.values(), key=lambda e: -e["max_abs"])})
    tokens: dict[tuple[int, int], dict] = {}
    for layer in range(VAR_FIRST_LAYER, n_layers - 1):
        for b, n, d, v in (records.get(layer) or {}).get("rms_hits", []):
            if d not in sink_dims:
                continue
            e = tokens.setdefault((b, n), {"sample": b, "position": n - int(first[b]), "layers": [], "max_normed": 0.0})
            if layer not in e["layers"]:
                e["layers"].append(layer)
            e["max_normed"] = max(e["max_normed"], abs(v))
    return {
        "rule": f"|h| > max({RATIO:g} x median|h|, floor); VAR: |RMSNorm(h)_d| > {tau:g} on discovered dims",
        "per_layer": per_layer, "layers": layers, "sink_dims": sorted(sink_dims),
        "var_sink_tokens": sorted(tokens.values(), key=lambda e: (-len(e["layers"]), e["sample"], e["position"])),
    }


class MassiveActivations:
    """Context manager: hooks every block's output, reduces it on the fly; read ``result()`` after.

    Example::

        with MassiveActivations(model, attention_mask=mask) as ma:
            model(input_ids, attention_mask=mask)
        ma.result()

    Args:
        attention_mask: (B, N) 1 for real tokens (None: all real); padded tokens are ignored.
    """

    def __init__(self, model: torch.nn.Module, *, attention_mask: torch.Tensor | None = None,
                 ratio: float = RATIO, floor: float = FLOOR, tau: float = TAU) -> None:
        _check(ratio, floor, tau)
        self.model, self.attention_mask = model, attention_mask
        self.ratio, self.floor, self.tau = ratio, floor, tau
        self.blocks = find_blocks(model)
        self.records: dict[int, dict] = {}
        self._handles: list = []
        self._first = None

    def _hook(self, layer: int):
        def hook(_module, _args, output):
            h = first_output(output)
            mask = self.attention_mask
            real = torch.ones(h.shape[:2], dtype=torch.bool) if mask is None else mask.bool().cpu()
            if tuple(real.shape) != tuple(h.shape[:2]):
                raise ValueError(f"`attention_mask` shape {tuple(real.shape)} does not match hidden states {tuple(h.shape[:2])}")
            self._first = real.long().argmax(1)
            self.records[layer] = reduce_layer(h, real, ratio=self.ratio, floor=self.floor, tau=self.tau)
        return hook

    def __enter__(self) -> "MassiveActivations":
        self.records = {}
        self._handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self) -> dict:
        first = self._first if self._first is not None else torch.zeros(1, dtype=torch.long)
        out = summarize(self.records, len(self.blocks), first, tau=self.tau)
        out["ratio"], out["floor"], out["tau"] = self.ratio, self.floor, self.tau
        return out


def massive_activations(hidden_states: Sequence[torch.Tensor], *, attention_mask: torch.Tensor | None = None,
                        ratio: float = RATIO, floor: float = FLOOR, tau: float = TAU) -> dict:
    """The same summary from a list of block outputs h (B, N, D), e.g. ``output_hidden_states[1:]``."""
    _check(ratio, floor, tau)
    b, n = hidden_states[0].shape[:2]
    real = torch.ones(b, n, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    records = {l: reduce_layer(h, real, ratio=ratio, floor=floor, tau=tau) for l, h in enumerate(hidden_states)}
    out = summarize(records, len(hidden_states), real.long().argmax(1), tau=tau)
    out["ratio"], out["floor"], out["tau"] = ratio, floor, tau
    return out


def token_report(entries: list[dict], input_ids: torch.Tensor, tokenizer,
                 attention_mask: torch.Tensor | None = None) -> list[dict]:
    """Add ``index``, ``token_id`` and raw ``text`` to entries that carry ``sample`` and ``position``."""
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    first = torch.zeros(ids.shape[0], dtype=torch.long) if attention_mask is None else attention_mask.long().argmax(1)
    out = []
    for e in entries:
        col = int(first[e["sample"]]) + e["position"]
        tid = int(ids[e["sample"], col])
        out.append({**e, "index": col, "token_id": tid, "text": tokenizer.decode([tid])})
    return out
