"""Head importance by ablation: how much the next-token loss rises when one head's output is zeroed.

The pruning-based head importance of "How Does Attention Work in Vision Transformers? A Visual
Analytics Attempt" (Li et al., arXiv 2303.13731) and of "Are Sixteen Heads Really Better than One?"
(Michel et al., 2019): importance(l, h) = CE(input | head (l, h) zeroed) - CE(input), with CE the
mean next-token cross-entropy over the real positions of the input.

How a head is zeroed (the simplest exact way): a forward pre-hook on the attention output
projection (``o_proj`` / ``c_proj`` / BERT ``attention.output.dense``) zeroes the head's slice
``[h * Dv, (h + 1) * Dv)`` of its input, which is the heads' outputs concatenated (B, N, H * Dv);
this is exactly the head's contribution before the projection, for any attention kernel.

Batched: one forward per group of up to K heads of the same layer l; copy c ablates its own head.
Blocks before l are the same for every copy, so the forward runs them once (batch 1) and a forward
pre-hook on block l repeats the hidden states K times (the other block arguments, positions and an
unpadded mask, have batch 1 and broadcast). Copies never interact (attention is per sample), so the
result equals ablating one head at a time up to float rounding; sharing the prefix roughly halves
the work. ``share_prefix=False`` replicates the input instead (for blocks whose arguments do not
broadcast).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ._modules import find_blocks, out_proj


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B,) mean cross-entropy of predicting ``input_ids[:, 1:]`` from ``logits[:, :-1]`` (B, N, V), real pairs only."""
    b, n, v = logits.shape
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, v), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(b, n - 1).double()
    ok = torch.ones(b, n - 1, dtype=torch.bool) if attention_mask is None else (
        attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool())
    ok = ok.to(ce.device)
    return (ce * ok).sum(1) / ok.sum(1).clamp_min(1)


def _ablating_hook(assign: dict, head_dim: int):
    """Pre-hook zeroing, for each batch item c in ``assign``, the slice of head ``assign[c]``."""
    def hook(_module, args):
        x = args[0]
        if not assign:
            return None
        x = x.clone()
        for c, h in assign.items():
            x[c, ..., h * head_dim : (h + 1) * head_dim] = 0
        return (x, *args[1:])
    return hook


def _repeat_batch(k: int):
    """Block pre-hook: repeat the hidden states (1, N, D) to (k, N, D)."""
    def hook(_module, args, kwargs):
        if args:
            return (args[0].expand(k, *args[0].shape[1:]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"].expand(k, *kwargs["hidden_states"].shape[1:])
        return args, kwargs
    return hook


def ablation_losses(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    heads: list[tuple[int, int]],
    *,
    attention_mask: torch.Tensor | None = None,
    batch_size: int | None = None,
    share_prefix: bool = True,
    progress: bool = True,
) -> list[float]:
    """Next-token loss of ``input_ids`` (1, N) with each (layer, head) of ``heads`` zeroed, one value per head.

    Args:
        batch_size: copies per forward (None: as many as fit ~1 GB of logits, at most 32).
        share_prefix: run the blocks before the ablated layer once (see module doc).
    """
    _check_lm(model, input_ids)
    blocks = find_blocks(model)
    n_heads = model.config.get_text_config().num_attention_heads
    projs = [out_proj(b) for b in blocks]
    for layer, head in heads:
        if not (0 <= layer < len(blocks) and 0 <= head < n_heads):
            raise ValueError(f"head (layer, head)=({layer}, {head}) out of range: {len(blocks)} layers, {n_heads} heads")
    width = projs[0].in_features if hasattr(projs[0], "in_features") else projs[0].weight.shape[0]
    head_dim = width // n_heads
    n, vocab = input_ids.shape[1], model.get_output_embeddings().weight.shape[0]
    if batch_size is None:
        batch_size = max(1, min(32, int(1e9 // (4 * n * vocab))))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1 or None; got {batch_size=}")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        share_prefix = False  # a padding mask is built per batch item: replicate the input instead
    # groups of heads of one layer (sharing the prefix needs one ablated layer per forward)
    order = sorted(range(len(heads)), key=lambda i: heads[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < batch_size and (not share_prefix or heads[groups[-1][0]][0] == heads[i][0]):
            groups[-1].append(i)
        else:
            groups.append([i])
    assign: list[dict] = [{} for _ in blocks]
    handles = [p.register_forward_pre_hook(_ablating_hook(assign[i], head_dim)) for i, p in enumerate(projs)]
    out = [0.0] * len(heads)
    try:
        with torch.no_grad(), tqdm(total=len(heads), desc="head ablation", disable=not progress) as bar:
            for group in groups:
                for a in assign:
                    a.clear()
                for c, i in enumerate(group):
                    layer, head = heads[i]
                    assign[layer][c] = head
                k = len(group)
                repeat = None
                if share_prefix:
                    repeat = blocks[heads[group[0]][0]].register_forward_pre_hook(_repeat_batch(k), with_kwargs=True)
                    ids, mask = input_ids, attention_mask
                else:
                    ids = input_ids.expand(k, -1)
                    mask = None if attention_mask is None else attention_mask.expand(k, -1)
                try:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                finally:
                    if repeat is not None:
                        repeat.remove()
                if logits.shape[0] != k:
                    raise RuntimeError(f"expected {k} copies of the logits, got {tuple(logits.shape)}; "
                                       "retry with share_prefix=False")
                losses = next_token_loss(logits, input_ids.expand(k, -1),
                                         None if attention_mask is None else attention_mask.expand(k, -1))
                for c, i in enumerate(group):
                    out[i] = float(losses[c])
                bar.update(k)
    finally:
        for h in handles:
            h.remove()
    return out


def _check_lm(model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None:
        raise ValueError(f"head importance needs a language model with an output head (logits); "
                         f"{type(model).__name__} has none (an encoder such as BertModel?)")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"`input_ids` must be (1, N) with N >= 2; got {tuple(input_ids.shape)=}")


def head_importance(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    batch_size: int | None = None,
    share_prefix: bool = True,
    progress: bool = True,
) -> dict:
    """Loss change for every (layer, head) of ``model`` on ``input_ids`` (1, N).

    Returns:
        ``{"base_loss", "per_head": {"loss_delta": [L][H], "ablated_loss": [L][H]}}``.
    """
    _check_lm(model, input_ids)
    n_layers = len(find_blocks(model))
    n_heads = model.config.get_text_config().num_attention_heads
    with torch.no_grad():
        base = float(next_token_loss(model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits,
                                     input_ids, attention_mask)[0])
    heads = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    losses = ablation_losses(model, input_ids, heads, attention_mask=attention_mask,
                             batch_size=batch_size, share_prefix=share_prefix, progress=progress)
    grid = [losses[l * n_heads : (l + 1) * n_heads] for l in range(n_layers)]
    return {"base_loss": base, "per_head": {"loss_delta": [[v - base for v in row] for row in grid],
                                             "ablated_loss": grid}}
