"""Label-free measurements on calibration prompts, shared by the interventions that choose heads or strengths.

Calibration prompts are token-id lists (``list[list[int]]``) from a split that is never reported. They are
left-padded into one batch, so the last column is every prompt's last token.
"""
from __future__ import annotations

from typing import Sequence

import torch


def check_calibration(calibration, arg: str = "calibration", *, required: bool = True) -> list[list[int]]:
    """Validate token-id prompts: a non-empty list of non-empty int lists."""
    if calibration is None or (isinstance(calibration, Sequence) and len(calibration) == 0):
        if required:
            raise ValueError(f"`{arg}` must hold at least one token-id prompt to measure on; got {calibration=!r}")
        return []
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Sequence):
        raise ValueError(f"`{arg}` must be a list of token-id lists; got {type(calibration)=}")
    out = []
    for i, prompt in enumerate(calibration):
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt
        if (not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)) or not ids
                or any(isinstance(t, bool) or not isinstance(t, int) for t in ids)):
            raise ValueError(f"`{arg}[{i}]` must be a non-empty list of token ids (ints); got {prompt!r:.80}")
        out.append(list(ids))
    return out


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int = 0, max_len: int | None = None,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, T), attention_mask (B, T)) on ``device``: prompts left-padded (and cut to their last ``max_len`` tokens)."""
    cut = [list(p)[-max_len:] if max_len else list(p) for p in prompts]
    n = max(len(p) for p in cut)
    ids = torch.full((len(cut), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(cut), n, dtype=torch.long)
    for i, p in enumerate(cut):
        ids[i, n - len(p):] = torch.tensor(p)
        mask[i, n - len(p):] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids that count real tokens only, so a left-padded row sees what it sees alone."""
    return (mask.cumsum(1) - 1).clamp_min(0)


@torch.no_grad()
def last_token_entropy(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) entropy (nats) of each prompt's next-token distribution after its last token."""
    ids, mask = ids.to(model.device), mask.to(model.device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                   logits_to_keep=1).logits[:, -1].float()  # (B, V)
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def prompt_nll(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean negative log-likelihood of each prompt's own tokens (after its first), in nats per token."""
    ids, mask = ids.to(model.device), mask.to(model.device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                   use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
    target = ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, T-1)
    real = (mask[:, 1:] * mask[:, :-1]).float()
    return (nll * real).sum(1) / real.sum(1).clamp_min(1.0)
