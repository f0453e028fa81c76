"""``run_diagnostics``: every diagnostic of a model on one input, in one attached forward pass.

Pass 1 (the input): attention observers (sinks + hidden sinks from one column-mass accumulator,
entropy/distance/locality, previous-token, thumbnails) through :func:`attnlab.attach`, plus block
hooks for massive activations and layer redundancy. Pass 2: a short repeated random-token probe for
induction/echo scores. Optional pass 3: head ablation (batched; ~L*H/K forwards).

Schema of the returned dict (``"schema": "attnlab.diagnostics/1"``; all plain JSON):

- ``model``: {"class", "n_layers", "n_heads", "causal"}; ``input``: {"batch", "n_tokens", "tokens"}
  (``tokens``: decoded text of each token of sample 0, raw: escape before HTML);
- ``per_head``: {metric: [L][H] floats}, every per-head metric in one place for heatmaps:
  ``sink_alpha_first``, ``hidden_sink_max_alpha``, ``hidden_sink_count``, ``entropy``,
  ``entropy_normalized``, ``mean_distance``, ``prev_token``, ``induction``, ``echo`` and, with
  ablation, ``ablation_loss_delta``;
- ``per_layer``: {metric: [L] floats}: ``sink_ratio``, ``attn_cosine``, ``attn_importance``,
  ``massive_max_abs``, ``massive_median_abs``, ``massive_max_ratio``, ``massive_count``;
- ``sinks``: :class:`.sinks.SinkObserver` result (``sink_ratio`` over (sample, layer, head) with
  ``epsilon``; ``top_sinks`` [L][H][k] of [position, alpha]);
- ``hidden_sinks``: result of :mod:`.hidden_sinks`; its ``tokens`` carry ``index``, ``token_id``, ``text``;
- ``head_stats``: entropy, distance and ``locality`` [L][H][n_buckets] with ``locality_buckets`` labels;
- ``prev_token``, ``induction`` (with ``period``, ``prefix``);
- ``massive_activations``: per-layer dims and their tokens; ``var_sink_tokens`` with token text;
- ``layer_redundancy``: per-layer cosine/importance and ``drop_order``;
- ``head_importance``: {"base_loss", "per_head"} or None without ablation;
- ``thumbnails``: {"size", "n_keys", "heads": [[l, h]], "maps": [k][S][S]} for a few chosen heads;
- ``timing_s``: seconds per pass.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..hf.attach import attach, attention_layers
from .head_importance import head_importance
from .head_stats import HeadStatsObserver
from .hidden_sinks import hidden_sink_report, hidden_sinks_of
from .induction import InductionObserver, PrevTokenObserver, repeated_random_tokens
from .layer_redundancy import LayerRedundancy
from .massive_activations import MassiveActivations, token_report
from .sinks import SinkObserver
from .thumbnails import ThumbnailObserver

SCHEMA = "attnlab.diagnostics/1"
INDUCTION_PERIOD = 64  # random block length: 2 copies + BOS = 129 tokens, a cheap second pass
MAX_THUMBNAILS = 12


def _check_inputs(input_ids, attention_mask, chunk: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"`input_ids` must be an integer tensor (B, N); got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"`input_ids` must be (B, N) with B, N >= 1; got {tuple(input_ids.shape)=}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"`attention_mask` must match input_ids {tuple(input_ids.shape)}; got {tuple(attention_mask.shape)=}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"`chunk` must be an int >= 1; got {chunk=}")


def choose_heads(per_head: dict, n_max: int = MAX_THUMBNAILS) -> list[tuple[int, int]]:
    """A few heads worth a picture: the extremes of each per-head metric (deduplicated)."""
    picks: list[tuple[int, int]] = []
    rules = [("sink_alpha_first", max), ("sink_alpha_first", min), ("prev_token", max), ("induction", max),
             ("entropy_normalized", max), ("entropy_normalized", min), ("mean_distance", max),
             ("hidden_sink_max_alpha", max), ("ablation_loss_delta", max), ("echo", max)]
    for name, pick in rules:
        grid = per_head.get(name)
        if not grid:
            continue
        cells = [(v, (l, h)) for l, row in enumerate(grid) if row for h, v in enumerate(row) if v is not None]
        if cells:
            best = pick(cells)[1]
            if best not in picks:
                picks.append(best)
    return picks[:n_max] or [(0, 0)]


def run_diagnostics(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    chunk: int = 256,
    ablation: bool = False,
    progress: bool = True,
    induction_period: int = INDUCTION_PERIOD,
    thumbnail_size: int = 64,
    seed: int = 0,
) -> dict:
    """Run every diagnostic of :mod:`attnlab.analysis` on ``input_ids`` (B, N); see the module doc for the schema.

    Args:
        model, tokenizer: a transformers model that attnlab can attach to, and its tokenizer.
        input_ids: (B, N) token ids; ``attention_mask`` (B, N) marks real tokens when padded.
        chunk: query rows per chunk of the streamed attention (memory O(chunk x N) per layer).
        ablation: also zero each head in turn and measure the loss change (causal LMs; sample 0).
        progress: show progress bars.
    """
    _check_inputs(input_ids, attention_mask, chunk)
    layers = attention_layers(model)
    causal = bool(getattr(next(iter(layers.values())), "is_causal", True)) if layers else True
    n_heads = model.config.get_text_config().num_attention_heads
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    mask = None if attention_mask is None else attention_mask.to(device)
    timing = {}
    stages = tqdm(total=3 if ablation else 2, desc="diagnostics", disable=not progress)

    sinks, stats, prev, thumbs = SinkObserver(), HeadStatsObserver(), PrevTokenObserver(), ThumbnailObserver(thumbnail_size)
    t = time.perf_counter()
    with MassiveActivations(model, attention_mask=attention_mask) as massive, \
            LayerRedundancy(model, attention_mask=attention_mask) as redundancy, \
            attach(model, observers=[thumbs, sinks, stats, prev], chunk=chunk), torch.no_grad():  # thumbs first: sinks reuse its row sums
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    timing["main_pass"] = time.perf_counter() - t
    stages.update(1)

    special = list(getattr(tokenizer, "all_special_ids", []) or [])
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    probe = repeated_random_tokens(induction_period, vocab_size=len(tokenizer), bos_token_id=bos,
                                   exclude_ids=special, seed=seed).to(device)
    induction = InductionObserver(induction_period, prefix=0 if bos is None else 1)
    t = time.perf_counter()
    with attach(model, observers=[induction], chunk=chunk), torch.no_grad():
        model(input_ids=probe, use_cache=False)
    timing["induction_pass"] = time.perf_counter() - t
    stages.update(1)

    importance = None
    if ablation:
        t = time.perf_counter()
        importance = head_importance(model, ids[:1], attention_mask=None if mask is None else mask[:1], progress=progress)
        timing["ablation"] = time.perf_counter() - t
        stages.update(1)
    stages.close()

    sink_r, hidden_r = sinks.result(), hidden_sinks_of(sinks)
    hidden_r["tokens"] = hidden_sink_report(hidden_r, input_ids, tokenizer, attention_mask)
    stats_r, prev_r, ind_r = stats.result(), prev.result(), induction.result()
    mass_r = massive.result()
    mass_r["var_sink_tokens"] = token_report(mass_r["var_sink_tokens"], input_ids, tokenizer, attention_mask)
    red_r = redundancy.result()

    per_head = {
        "sink_alpha_first": sink_r["per_head"]["alpha_first"],
        "hidden_sink_max_alpha": sink_r["per_head"]["max_alpha_later"],
        "hidden_sink_count": hidden_r["per_head"]["n_hidden_sinks"],
        **stats_r["per_head"],
        "prev_token": prev_r["per_head"]["prev_token"],
        "induction": ind_r["per_head"]["induction"],
        "echo": ind_r["per_head"]["echo"],
    }
    if importance is not None:
        per_head["ablation_loss_delta"] = importance["per_head"]["loss_delta"]
    per_layer = {
        "sink_ratio": sink_r["per_layer"]["sink_ratio"],
        **red_r["per_layer"],
        "massive_max_abs": mass_r["per_layer"]["max_abs"],
        "massive_median_abs": mass_r["per_layer"]["median_abs"],
        "massive_max_ratio": mass_r["per_layer"]["max_ratio"],
        "massive_count": mass_r["per_layer"]["n_massive"],
    }
    first = 0 if attention_mask is None else int(attention_mask[0].long().argmax())
    return {
        "schema": SCHEMA,
        "model": {"class": type(model).__name__, "n_layers": len(layers), "n_heads": n_heads, "causal": causal},
        "input": {"batch": int(input_ids.shape[0]), "n_tokens": int(input_ids.shape[1]),
                  "tokens": [tokenizer.decode([int(i)]) for i in input_ids[0, first:]]},
        "per_head": per_head,
        "per_layer": per_layer,
        "sinks": sink_r,
        "hidden_sinks": hidden_r,
        "head_stats": stats_r,
        "prev_token": prev_r,
        "induction": ind_r,
        "massive_activations": mass_r,
        "layer_redundancy": red_r,
        "head_importance": importance,
        "thumbnails": thumbs.result(choose_heads(per_head)),
        "timing_s": timing,
    }
