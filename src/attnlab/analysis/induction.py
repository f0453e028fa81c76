"""Previous-token and induction scores per head, and the repeated random-token probe input.

Induction heads ("In-context Learning and Induction Heads", Olsson et al., 2022) attend from a token
to the token that followed its earlier occurrence; RazorAttention (Tang et al., arXiv 2407.15891)
detects them data-free on repeated random tokens, as done here. Previous-token heads attend to i - 1.

- previous-token score: mean over real query rows i >= 1 (relative to the first real token) of p_{i,i-1};
- induction score on ``[bos] + r + r (+ r ...)`` with r random of length ``period``: mean over the
  queries of the second and later copies of p_{i, i - period + 1}; the echo score (attention to the
  earlier copy of the same token) p_{i, i - period} comes with it.
State: O(L * H).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..probes.base import CallContext, Observer
from ..probes.visibility import chunk_positions, first_real_key, query_valid


def repeated_random_tokens(
    period: int,
    *,
    vocab_size: int,
    n_repeats: int = 2,
    bos_token_id: int | None = None,
    exclude_ids: Sequence[int] = (),
    batch: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    """(batch, [1 +] period * n_repeats) long: random ids, the same ``period`` ids repeated.

    Args:
        period: length of the random block.
        vocab_size: ids are drawn from [0, vocab_size) minus ``exclude_ids`` (e.g. special tokens).
        n_repeats: copies of the block (>= 2 for an induction score).
        bos_token_id: prepended when not None (the first-token sink then sits on it).
    """
    if not isinstance(period, int) or period < 2:
        raise ValueError(f"`period` must be an int >= 2; got {period=}")
    if not isinstance(n_repeats, int) or n_repeats < 2:
        raise ValueError(f"`n_repeats` must be an int >= 2; got {n_repeats=}")
    if batch < 1:
        raise ValueError(f"`batch` must be >= 1; got {batch=}")
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in exclude_ids if 0 <= i < vocab_size]] = False
    pool = allowed.nonzero().flatten()
    if len(pool) < period:
        raise ValueError(f"need at least {period=} allowed ids; got {vocab_size=} minus {len(exclude_ids)} excluded")
    gen = torch.Generator().manual_seed(seed)
    # distinct ids inside a block, so each token's earlier occurrence is unique
    block = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:period]] for _ in range(batch)])
    ids = block.repeat(1, n_repeats)
    if bos_token_id is not None:
        ids = torch.cat([torch.full((batch, 1), bos_token_id, dtype=torch.long), ids], dim=1)
    return ids


class _OffsetScore(Observer):
    """Mean of p_{i, i - offset} over real query rows that pass ``_rows``; per (layer, head)."""

    offset: int = 1
    narrow_ok = True

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sum: dict[int, torch.Tensor] = {}
        self._n: dict[int, float] = {}
        self.n_layers: int | None = None

    def _rows(self, rel: torch.Tensor) -> torch.Tensor:
        return rel >= self.offset

    def _gather(self, ctx: CallContext, q_start: int, probs: torch.Tensor, offset: int, rows_ok: torch.Tensor):
        b, h, c, _ = probs.shape
        pos = chunk_positions(ctx, q_start, c)
        target = (pos - offset).clamp_min(0)
        inside = target < probs.shape[-1]  # keys beyond a narrowed chunk hold exactly 0
        index = target.clamp(max=probs.shape[-1] - 1).to(probs.device).view(1, 1, c, 1).expand(b, h, c, 1)
        vals = probs.detach().gather(-1, index)[..., 0].float().cpu()
        return torch.where((rows_ok & inside)[:, None, :], vals.double(), 0.0).sum((0, 2))

    def observe(self, ctx: CallContext, q_start: int, probs: torch.Tensor) -> None:
        b, h, c, _ = probs.shape
        self.n_layers = ctx.n_layers
        pos = chunk_positions(ctx, q_start, c)
        rel = pos[None, :] - first_real_key(ctx.key_padding, b)[:, None]  # (B, C)
        ok = self._rows(rel) & query_valid(ctx, q_start, c, b)
        self._sum[ctx.layer] = self._sum.get(ctx.layer, torch.zeros(h, dtype=torch.float64)) + self._gather(
            ctx, q_start, probs, self.offset, ok)
        self._n[ctx.layer] = self._n.get(ctx.layer, 0.0) + float(ok.sum())

    def scores(self) -> list:
        return [None if l not in self._sum else (self._sum[l] / max(self._n[l], 1.0)).tolist()
                for l in range(self.n_layers or 0)]


class PrevTokenObserver(_OffsetScore):
    """Previous-token score: mean p_{i, i-1}; ``result()["per_head"]["prev_token"]`` is [L][H]."""

    offset = 1

    def result(self) -> dict:
        return {"per_head": {"prev_token": self.scores()}}


class InductionObserver(_OffsetScore):
    """Induction and echo scores on a repeated block of ``period`` tokens after ``prefix`` tokens.

    Rows scored: positions rel >= prefix + period (second and later copies), rel relative to the
    first real token. ``result()["per_head"]`` holds ``induction`` and ``echo`` as [L][H].
    """

    def __init__(self, period: int, prefix: int = 1) -> None:
        if not isinstance(period, int) or period < 2:
            raise ValueError(f"`period` must be an int >= 2; got {period=}")
        if not isinstance(prefix, int) or prefix < 0:
            raise ValueError(f"`prefix` must be an int >= 0; got {prefix=}")
        self.period, self.prefix = period, prefix
        self.offset = period - 1
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self._echo: dict[int, torch.Tensor] = {}

    def _rows(self, rel: torch.Tensor) -> torch.Tensor:
        return rel >= self.prefix + self.period

    def observe(self, ctx: CallContext, q_start: int, probs: torch.Tensor) -> None:
        super().observe(ctx, q_start, probs)
        b, h, c, _ = probs.shape
        pos = chunk_positions(ctx, q_start, c)
        rel = pos[None, :] - first_real_key(ctx.key_padding, b)[:, None]
        ok = self._rows(rel) & query_valid(ctx, q_start, c, b)
        self._echo[ctx.layer] = self._echo.get(ctx.layer, torch.zeros(h, dtype=torch.float64)) + self._gather(
            ctx, q_start, probs, self.period, ok)

    def result(self) -> dict:
        echo = [None if l not in self._echo else (self._echo[l] / max(self._n[l], 1.0)).tolist()
                for l in range(self.n_layers or 0)]
        return {"period": self.period, "prefix": self.prefix,
                "per_head": {"induction": self.scores(), "echo": echo}}


def offset_scores(
    attentions: Sequence[torch.Tensor], offset: int, *, first_row: int = 1,
    key_padding: torch.Tensor | None = None,
) -> list[list[float]]:
    """Reference: [L][H] mean of p_{i, i - offset} over real rows with i - first_token >= first_row."""
    b, _, n, _ = attentions[0].shape
    kp = torch.ones(b, n, dtype=torch.bool) if key_padding is None else key_padding.bool()
    first = kp.long().argmax(1)
    out = []
    for a in attentions:
        tot = torch.zeros(a.shape[1], dtype=torch.float64)
        cnt = 0
        for s in range(b):
            for i in range(n):
                if kp[s, i] and i - int(first[s]) >= first_row:
                    tot += a[s, :, i, i - offset].double()
                    cnt += 1
        out.append((tot / max(cnt, 1)).tolist())
    return out


def prev_token_scores(attentions, *, key_padding=None) -> list[list[float]]:
    """Reference previous-token score [L][H] from full maps."""
    return offset_scores(attentions, 1, first_row=1, key_padding=key_padding)


def induction_scores(attentions, period: int, prefix: int = 1, *, key_padding=None) -> dict:
    """Reference induction and echo scores [L][H] from full maps."""
    return {"induction": offset_scores(attentions, period - 1, first_row=prefix + period, key_padding=key_padding),
            "echo": offset_scores(attentions, period, first_row=prefix + period, key_padding=key_padding)}
